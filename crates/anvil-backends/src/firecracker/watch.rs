//! Event-driven waiting (no sleep-polling): inotify for files and sockets appearing or
//! growing, pidfd for a process exiting.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// A pidfd: readable once the process has exited. Works for non-children (adopted VMs).
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    pub fn open(pid: i32) -> io::Result<Self> {
        // SAFETY: plain syscall; returns a new fd we own or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh, valid fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        // SAFETY: OwnedFd keeps the same open fd for the AsyncFd's whole lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
        Ok(PidFd { fd })
    }

    /// Resolves when the process exits. Cancel-safe.
    pub async fn exited(&self) {
        // A pidfd stays readable after exit, so one readiness event is enough.
        let _ = self.fd.readable().await;
    }

    /// Sends `sig` through the pidfd (cannot hit a reused pid).
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<u8>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// Reaps `pid` if it is our exited child (no-op for non-children or live processes).
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG never blocks; ECHILD for non-children is fine.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// An inotify instance watching one directory.
struct Inotify {
    fd: AsyncFd<OwnedFd>,
}

impl Inotify {
    fn watch(dir: &Path, mask: u32) -> io::Result<Self> {
        // SAFETY: plain syscall.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cpath = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cpath.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: OwnedFd keeps the same open fd for the AsyncFd's whole lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
        Ok(Inotify { fd })
    }

    /// Waits for at least one event and drains the queue (callers re-check their condition).
    async fn next(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let r = guard.try_io(|fd| {
                // SAFETY: reading into a stack buffer of the given size.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n)
                }
            });
            match r {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Why a wait ended without its condition.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the Firecracker process exited")]
    Exited,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Re-evaluates `check` whenever something changes in `dir` (create, write, move), until it
/// returns `Some`, the process behind `pidfd` exits, or `timeout` passes.
pub async fn wait_in_dir<T>(
    dir: &Path,
    timeout: Duration,
    pidfd: Option<&PidFd>,
    mut check: impl FnMut() -> io::Result<Option<T>>,
) -> Result<T, WaitError> {
    let ino = Inotify::watch(
        dir,
        libc::IN_CREATE | libc::IN_MODIFY | libc::IN_MOVED_TO | libc::IN_ATTRIB,
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        // Checked after the watch exists, so no change can slip between check and wait.
        if let Some(v) = check()? {
            return Ok(v);
        }
        let exited = async {
            match pidfd {
                Some(p) => p.exited().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = ino.next() => r?,
            _ = exited => {
                // One last look: the process may have written its output and then exited.
                return check()?.ok_or(WaitError::Exited);
            }
            _ = tokio::time::sleep_until(deadline) => return Err(WaitError::Timeout(timeout)),
        }
    }
}

/// Connects to a Unix socket that exists but may not be listening yet (between its
/// bind(2) and listen(2)): retries with a 1 ms backoff, at most `bound` in total.
pub async fn connect_retry(path: &Path, bound: Duration) -> io::Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Incremental reader of a growing log file that looks for a marker.
pub struct MarkerScan {
    path: PathBuf,
    marker: Vec<u8>,
    offset: u64,
    /// Tail of the previous read, so a marker split across reads is still found.
    carry: Vec<u8>,
}

impl MarkerScan {
    pub fn new(path: impl Into<PathBuf>, marker: &str, from_offset: u64) -> Self {
        MarkerScan {
            path: path.into(),
            marker: marker.as_bytes().to_vec(),
            offset: from_offset,
            carry: Vec::new(),
        }
    }

    /// Reads what was appended since the last call; true once the marker has been seen.
    pub fn found(&mut self) -> io::Result<bool> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut fresh = Vec::new();
        f.read_to_end(&mut fresh)?;
        self.offset += fresh.len() as u64;
        let mut hay = std::mem::take(&mut self.carry);
        hay.extend_from_slice(&fresh);
        if hay
            .windows(self.marker.len().max(1))
            .any(|w| w == self.marker.as_slice())
        {
            return Ok(true);
        }
        let keep = self.marker.len().saturating_sub(1).min(hay.len());
        self.carry = hay[hay.len() - keep..].to_vec();
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn marker_split_across_writes_is_found_by_event() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"noise ANVIL-RE").unwrap();
        let mut scan = MarkerScan::new(&log, "ANVIL-READY", 0);
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
                f.write_all(b"ADY\n").unwrap();
            })
        };
        let t0 = std::time::Instant::now();
        wait_in_dir(dir.path(), Duration::from_secs(5), None, || {
            Ok(scan.found()?.then_some(()))
        })
        .await
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(4));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn wait_times_out_and_notices_exit() {
        let dir = tempfile::tempdir().unwrap();
        let r = wait_in_dir(dir.path(), Duration::from_millis(50), None, || {
            Ok(None::<()>)
        })
        .await;
        assert!(matches!(r, Err(WaitError::Timeout(_))));

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pidfd = PidFd::open(child.id() as i32).unwrap();
        let r = wait_in_dir(dir.path(), Duration::from_secs(5), Some(&pidfd), || {
            Ok(None::<()>)
        })
        .await;
        assert!(matches!(r, Err(WaitError::Exited)));
        child.wait().unwrap();
    }
}
