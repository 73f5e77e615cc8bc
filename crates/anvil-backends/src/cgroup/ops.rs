//! Operations on a live sandbox cgroup.

use super::{write_file, Cgroup, CgroupError, Mode};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long freeze/kill/remove wait for the kernel before giving up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between re-reads while waiting for the kernel (short: these settle in microseconds).
const TICK: Duration = Duration::from_millis(2);

/// Pre-opened `cgroup.procs` files (close-on-exec) of every hierarchy of a cgroup, so a
/// child can join them between fork and exec without allocating.
#[derive(Debug)]
pub struct ProcsFds {
    files: Vec<File>,
}

impl ProcsFds {
    /// Raw fds to hand to [`join_cgroup_raw`] inside `pre_exec`. Valid while `self` lives.
    pub fn raw(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Moves the calling process into the cgroups behind `fds` by writing "0" to each.
/// Async-signal-safe (only `write(2)`): meant for `CommandExt::pre_exec`.
pub fn join_cgroup_raw(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: fd is an open file descriptor owned by the parent's ProcsFds; the buffer is static.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Cgroup {
    /// Opens `cgroup.procs` of every directory for writing (see [`join_cgroup_raw`]).
    pub fn procs_fds(&self) -> Result<ProcsFds, CgroupError> {
        let mut files = Vec::new();
        for dir in self.dirs() {
            let p = dir.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| CgroupError::io(format!("open {}", p.display()), e))?;
            files.push(f);
        }
        Ok(ProcsFds { files })
    }

    /// Moves `pid` into every hierarchy of this cgroup.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in the cgroup (union over hierarchies). A missing directory counts as
    /// empty.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = BTreeSet::new();
        for dir in self.dirs() {
            let p = dir.join("cgroup.procs");
            match std::fs::read_to_string(&p) {
                Ok(text) => all.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(CgroupError::io(format!("read {}", p.display()), e)),
            }
        }
        Ok(all.into_iter().collect())
    }

    /// Freezes every process and waits until the kernel reports the cgroup frozen.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        match self.freezer()? {
            Freezer::V1(dir) => {
                let state = dir.join("freezer.state");
                write_file(&state, "FROZEN")?;
                wait_until(&format!("{} to read FROZEN", state.display()), || {
                    Ok(read(&state)?.trim() == "FROZEN")
                })
            }
            Freezer::V2(dir) => {
                write_file(&dir.join("cgroup.freeze"), "1")?;
                let events = dir.join("cgroup.events");
                wait_until(&format!("{} to report frozen 1", events.display()), || {
                    Ok(read(&events)?.lines().any(|l| l.trim() == "frozen 1"))
                })
            }
        }
    }

    /// Whether the cgroup is frozen (or being frozen) right now.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        match self.freezer()? {
            Freezer::V1(dir) => Ok(read(&dir.join("freezer.state"))?.trim() != "THAWED"),
            Freezer::V2(dir) => Ok(read(&dir.join("cgroup.freeze"))?.trim() == "1"),
        }
    }

    /// Thaws the cgroup (does not wait: thawed tasks run as soon as they are scheduled).
    pub fn thaw(&self) -> Result<(), CgroupError> {
        match self.freezer()? {
            Freezer::V1(dir) => write_file(&dir.join("freezer.state"), "THAWED"),
            Freezer::V2(dir) => write_file(&dir.join("cgroup.freeze"), "0"),
        }
    }

    /// Kills every process in the cgroup and waits until `cgroup.procs` is empty. Uses
    /// `cgroup.kill` where available; otherwise freeze → SIGKILL each → thaw, repeated.
    /// A cgroup that no longer exists is already empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if !self.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            self.kill_round()?;
            let left = self.pids()?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Timeout(format!(
                    "cgroup {} still has processes {left:?} after kill",
                    self.name
                )));
            }
            std::thread::sleep(TICK);
        }
    }

    fn kill_round(&self) -> Result<(), CgroupError> {
        let kill_file = self
            .unified
            .as_ref()
            .map(|u| u.join("cgroup.kill"))
            .filter(|p| p.exists());
        match kill_file {
            Some(kill) => {
                ignore_missing(write_file(&kill, "1"))?;
                // A v1 freezer holds killed tasks in the refrigerator: let them die.
                if self.mode != Mode::V2 {
                    ignore_missing(self.thaw())?;
                }
            }
            None => {
                // Freezing first stops a fork bomb from outrunning the kills.
                let frozen = ignore_missing(self.freeze());
                for pid in self.pids()? {
                    // ESRCH: already gone.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                ignore_missing(self.thaw())?;
                frozen?;
            }
        }
        // Let the kernel finish exiting the tasks before the caller re-reads cgroup.procs.
        for _ in 0..5 {
            if self.pids()?.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }

    /// Number of OOM kills the kernel performed in this cgroup so far.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let dir = self
            .memory_dir()
            .ok_or_else(|| CgroupError::Unusable("no memory cgroup".into()))?;
        let file = match self.mode {
            Mode::V2 => dir.join("memory.events"),
            Mode::V1 | Mode::Hybrid => dir.join("memory.oom_control"),
        };
        let text = read(&file)?;
        Ok(parse_counter(&text, "oom_kill").unwrap_or(0))
    }

    /// Removes every directory (retrying briefly while the kernel still reports it busy).
    /// Idempotent: missing directories are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for dir in self.dirs() {
            if let Err(e) = rmdir_retry(dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn freezer(&self) -> Result<Freezer, CgroupError> {
        match self.mode {
            Mode::V2 => self.unified.clone().map(Freezer::V2),
            Mode::V1 | Mode::Hybrid => self.v1.get("freezer").cloned().map(Freezer::V1),
        }
        .ok_or_else(|| CgroupError::Unusable(format!("cgroup {} has no freezer", self.name)))
    }
}

enum Freezer {
    V1(PathBuf),
    V2(PathBuf),
}

fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(CgroupError::io(format!("rmdir {}", dir.display()), e)),
        }
    }
}

fn wait_until(
    what: &str,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<(), CgroupError> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CgroupError::Timeout(format!("waiting for {what}")));
        }
        std::thread::sleep(TICK);
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map_err(|e| CgroupError::io(format!("read {}", path.display()), e))
}

/// Missing files (the cgroup was removed meanwhile) are treated as success.
fn ignore_missing(r: Result<(), CgroupError>) -> Result<(), CgroupError> {
    match r {
        Err(CgroupError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Finds `key value` in a flat-keyed file (`memory.events`, `memory.oom_control`).
pub(crate) fn parse_counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key)
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}
