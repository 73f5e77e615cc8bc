//! The only place that waits for children. One thread reaps every child (exec'd commands
//! and orphans re-parented to us as pid 1 / subreaper) and hands exit statuses of exec'd
//! commands to their handlers; statuses of other pids are dropped.
//!
//! std's `Command::spawn` itself waits for a child whose exec failed. To never steal that
//! status, the reaper only peeks (`waitid(WNOWAIT)`) without the lock, and reaps under the
//! same lock that is held across `spawn` + registration.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Raw `wait` status of an exec'd process.
pub type WaitStatus = libc::c_int;

#[derive(Default)]
struct State {
    waiters: HashMap<i32, Sender<WaitStatus>>,
    /// Bumped on every spawn; wakes the reaper when it had no children.
    generation: u64,
}

#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder cannot leave the map inconsistent (single inserts/removes).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and registers its pid; the receiver yields its wait status once.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Receiver<WaitStatus>)> {
        let mut st = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = channel();
        st.waiters.insert(child.id() as i32, tx);
        st.generation += 1;
        self.spawned.notify_all();
        Ok((child, rx))
    }

    /// Pids of exec'd processes still running (they lead their own process groups).
    pub fn running(&self) -> Vec<i32> {
        self.lock().waiters.keys().copied().collect()
    }

    /// Runs forever on its own thread.
    pub fn run(&self) {
        let mut seen_generation = 0;
        loop {
            // SAFETY: siginfo_t is plain data; waitid fills it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer; WNOWAIT leaves the child waitable.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ECHILD) => {
                        // No children: sleep until the next spawn (orphans only come from
                        // descendants, so none can appear meanwhile).
                        let mut st = self.lock();
                        while st.generation == seen_generation {
                            st = self.spawned.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        seen_generation = st.generation;
                        continue;
                    }
                    _ => {
                        crate::log(&format!("reaper: waitid failed: {e}; reaper stops"));
                        return;
                    }
                }
            }
            // SAFETY: waitid succeeded, so si_pid is the field that was set.
            let pid = unsafe { info.si_pid() };
            let mut st = self.lock();
            let mut status: libc::c_int = 0;
            // SAFETY: valid pointer. WNOHANG: if `spawn` already reaped it, this is ECHILD/0.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                if let Some(tx) = st.waiters.remove(&pid) {
                    // The handler may be gone (connection thread died); nothing to do then.
                    let _ = tx.send(status);
                }
            }
        }
    }
}
