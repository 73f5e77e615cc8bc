//! What the daemon hands to a backend: a resolved instance spec, and the backend's runtime record.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Resolved resource limits (policy `[quota]`), in plain numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub cpu_shares: Option<u64>,
    pub memory_high: Option<u64>,
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
}

/// VM sizing and boot settings (policy `[vm]`, `[backend.firecracker]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub boot_args: Option<String>,
    pub enable_vsock: bool,
    pub serial_log: bool,
}

/// The files of a template, as the backend needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFiles {
    pub id: String,
    /// Root filesystem directory (namespace backends: the overlay's lower layer).
    pub rootfs_dir: Option<PathBuf>,
    /// Root filesystem image (VM backends).
    pub rootfs_image: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// Directory holding a boot snapshot (VM backends).
    pub snapshot_dir: Option<PathBuf>,
    /// VM guests without an agent (the test guest): ready when this line appears on the
    /// serial console, instead of the agent's vsock `ready`.
    #[serde(default)]
    pub ready_marker: Option<String>,
}

/// Everything a backend needs to create (or re-create) one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub id: String,
    /// `<state_dir>/instances/<id>`; owned by the backend while the instance lives, removed on destroy.
    pub instance_dir: PathBuf,
    /// Cgroup name for this instance, relative to the daemon's cgroup root.
    pub cgroup_name: String,
    pub template: TemplateFiles,
    pub quota: Quota,
    /// Whether the policy grants network access (otherwise loopback only).
    pub network: bool,
    /// Environment for the agent and every exec.
    pub env: BTreeMap<String, String>,
    pub vm: Option<VmSpec>,
    /// Fork: start from the checkpoint in this directory instead of the template.
    pub from_checkpoint: Option<PathBuf>,
}

/// A backend's record of a live sandbox. The daemon persists it verbatim and passes it back;
/// `data` is private to the backend that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Runtime {
    pub backend: anvil_core::backend::BackendKind,
    /// Main process of the sandbox (bwrap, firecracker), if any.
    pub pid: Option<i32>,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22), to tell a reused pid.
    pub pid_start_time: Option<u64>,
    pub data: serde_json::Value,
}
