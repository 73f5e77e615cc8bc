//! Watching and stopping the bwrap process through a pidfd, which works whether or not it is
//! our child (after a daemon restart it is not).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// A pidfd for one process.
pub struct Pidfd {
    fd: AsyncFd<OwnedFd>,
    pid: i32,
}

impl Pidfd {
    /// Opens a pidfd for `pid`, but only if it is still the process that started at
    /// `start_time` (checked after opening, so a reused pid is never watched).
    pub fn open(pid: i32, start_time: Option<u64>) -> std::io::Result<Option<Pidfd>> {
        // SAFETY: plain syscall; the returned fd (if any) is owned below.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        if let Some(st) = start_time {
            if crate::procfs::pid_start_time(pid) != Some(st) {
                return Ok(None);
            }
        }
        // SAFETY: `owned` is a valid open fd that the AsyncFd owns (and closes) from here on.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }?;
        Ok(Some(Pidfd { fd, pid }))
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves once the process has exited (zombie or reaped). Cancel-safe.
    pub async fn exited(&self) {
        // A pidfd only becomes readable on exit; the readiness is kept (the guard is not
        // cleared) so later calls return at once.
        if let Err(e) = self.fd.readable().await {
            tracing::warn!(pid = self.pid, error = %e, "pidfd poll failed; falling back to /proc");
            while is_running(self.pid) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Waits up to `timeout` for exit; true if it exited.
    pub async fn exited_within(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.exited()).await.is_ok()
    }

    pub fn kill(&self) {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                0,
                0,
            )
        };
        if r < 0 {
            tracing::debug!(pid = self.pid, error = %std::io::Error::last_os_error(), "pidfd kill");
        }
    }

    /// Collects the exit status if the process was our child (no-op otherwise), so no
    /// zombie is left behind.
    pub fn reap(&self) {
        // SAFETY: zeroed siginfo is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ECHILD) {
                tracing::debug!(pid = self.pid, error = %e, "waitid");
            }
        }
    }
}

/// Alive and not a zombie.
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `pid` is running and is the process that started at `start_time`.
pub fn same_running_process(pid: i32, start_time: Option<u64>) -> bool {
    is_running(pid) && start_time.is_none_or(|st| crate::procfs::same_process(pid, st))
}
