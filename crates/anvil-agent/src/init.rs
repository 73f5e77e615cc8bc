//! Minimal init duties: mounts, hostname, signals, subreaper.

use crate::log;
use std::ffi::CString;
use std::path::Path;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialized by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM/SIGINT in the calling (main) thread; threads spawned later inherit it.
/// As pid 1 a blocked signal is still queued (an unhandled one would be dropped).
pub fn block_termination_signals() -> Result<(), String> {
    let set = termination_set();
    // SAFETY: valid sigset pointer.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(format!(
            "pthread_sigmask: {}",
            std::io::Error::from_raw_os_error(r)
        ));
    }
    Ok(())
}

/// Blocks until SIGTERM or SIGINT arrives; returns the signal.
pub fn wait_termination_signal() -> libc::c_int {
    let set = termination_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: valid pointers.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}

/// True in a VM's (or the host's) own pid namespace, false in a container's.
/// (`PROC_PID_INIT_INO`: the fixed inode of the initial pid namespace.)
pub fn in_initial_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == PROC_PID_INIT_INO)
}

/// Makes orphans of exec'd commands our children (pid 1 gets them anyway).
pub fn become_reaper() {
    if std::process::id() != 1 {
        // SAFETY: plain prctl.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            log(&format!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// Exec'd commands find programs through PATH; a kernel-started init has none.
pub fn ensure_path_env() {
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", DEFAULT_PATH);
    }
}

/// `--init`: mount /proc, /sys, /dev (+ /dev/shm), /tmp, /run unless already mounted; set
/// the hostname from ANVIL_HOSTNAME. Failures are logged, not fatal: a namespace sandbox
/// may forbid some mounts and already have what it needs.
pub fn setup() {
    if !Path::new("/proc/self/stat").exists() {
        mount(
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        );
    }
    let mounted = mount_points();
    let ensure = |target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>| {
        if !mounted.iter().any(|m| m == target) {
            mount(fstype, target, fstype, flags, data);
        }
    };
    ensure(
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    );
    ensure("/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755"));
    ensure(
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    ensure(
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    ensure(
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    );
    if let Ok(name) = std::env::var("ANVIL_HOSTNAME") {
        // SAFETY: pointer and length describe `name`.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            log(&format!(
                "sethostname({name:?}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// Mount points from /proc/self/mountinfo (field 5), with octal escapes decoded.
fn mount_points() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_octal)
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let d = &b[i + 1..i + 4];
            if d.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        log(&format!("mkdir {target}: {e}"));
        return;
    }
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (src, tgt, fs) = (c(source), c(target), c(fstype));
    let data = data.map(c);
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings (or null data).
    let r = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, data_ptr) };
    if r != 0 {
        log(&format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(super::unescape_octal("/a\\040b"), "/a b");
        assert_eq!(super::unescape_octal("/plain"), "/plain");
        assert_eq!(super::unescape_octal("/x\\"), "/x\\");
    }
}
