//! The instance directory of a bwrap sandbox and the runtime record persisted by the daemon.
//!
//! ```text
//! <instance_dir>/
//!   upper/  work/     overlay upper layer and its work dir
//!   rootfs/           overlay mount point (lower = template rootfs), bound as the sandbox's /
//!   run/              bound at /run/anvil: agent.sock, ready.sock, anvil-agent (ro bind)
//!   console.log       bwrap's and the agent's stdout/stderr
//! ```

use crate::cgroup::Cgroup;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Paths of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BwrapData {
    pub instance_dir: PathBuf,
    pub rootfs: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub run_dir: PathBuf,
    pub agent_socket: PathBuf,
    pub cgroup: Cgroup,
    /// The cgroup's OOM-kill count when the current agent started (supervision compares).
    #[serde(default)]
    pub oom_base: u64,
}

impl BwrapData {
    pub fn new(instance_dir: &Path, cgroup: Cgroup) -> Self {
        let run_dir = instance_dir.join("run");
        BwrapData {
            instance_dir: instance_dir.to_path_buf(),
            rootfs: instance_dir.join("rootfs"),
            upper: instance_dir.join("upper"),
            work: instance_dir.join("work"),
            agent_socket: run_dir.join("agent.sock"),
            run_dir,
            cgroup,
            oom_base: 0,
        }
    }

    pub fn ready_socket(&self) -> PathBuf {
        self.run_dir.join("ready.sock")
    }

    pub fn console_log(&self) -> PathBuf {
        self.instance_dir.join("console.log")
    }
}

/// Inside-the-sandbox paths.
pub const GUEST_RUN: &str = "/run/anvil";
pub const GUEST_AGENT: &str = "/run/anvil/anvil-agent";
pub const GUEST_AGENT_SOCK: &str = "unix:/run/anvil/agent.sock";
pub const GUEST_READY_SOCK: &str = "unix:/run/anvil/ready.sock";
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Longest usable `sun_path` (108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Up to 12 hostname-safe characters of the instance id.
pub fn short_hostname(id: &str) -> String {
    let s: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(12)
        .collect::<String>()
        .trim_matches('-')
        .to_ascii_lowercase();
    if s.is_empty() {
        "sandbox".into()
    } else {
        s
    }
}

/// Last `max` bytes of a log file, for error messages.
pub fn tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).trim().to_string()
        }
        Err(e) => format!("(no console log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_short_and_safe() {
        assert_eq!(short_hostname("inst_0123456789abcdef"), "inst01234567");
        assert_eq!(short_hostname("---"), "sandbox");
        assert_eq!(short_hostname("AB-c"), "ab-c");
    }
}
