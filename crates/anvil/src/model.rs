//! Records the daemon keeps (persisted in the store) and the API's request/response shapes.

use anvil_backends::{InstanceSpec, Runtime};
use anvil_core::backend::{BackendKind, CheckpointKind, ResetMode};
use anvil_core::lifecycle::{SandboxState, StartPath, TerminationReason};
use anvil_core::pool::PoolKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use utoipa::ToSchema;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 time of `ms` since the epoch.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// One sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    pub id: String,
    pub state: SandboxState,
    pub workload_class: String,
    pub policy: String,
    pub backend: BackendKind,
    pub start_path: StartPath,
    /// Template id the sandbox was made from, if any.
    pub template: Option<String>,
    pub image_digest: String,
    pub labels: BTreeMap<String, String>,
    pub kernel_version: Option<String>,
    pub reset_mode: ResetMode,
    pub created_at: String,
    pub updated_at: String,
    /// When the TTL reaper destroys it, if it has a TTL.
    pub expires_at: Option<String>,
    pub ttl_secs: Option<u64>,
    pub termination_reason: Option<TerminationReason>,
    pub destroyed_at: Option<String>,
    /// Checkpoint it was forked or restored from.
    pub from_checkpoint: Option<String>,
    pub reset_count: u64,
    /// Pool the instance belongs to while warm (or returns to on reset).
    pub pool: Option<PoolKey>,
    /// Last operation error, for instances that ended badly.
    pub last_error: Option<String>,
}

/// What the store keeps for an instance: the API view plus what only the daemon needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance: Instance,
    /// Milliseconds since the epoch of `expires_at`, for the reaper.
    pub expires_at_ms: Option<u64>,
    pub spec: InstanceSpec,
    pub runtime: Option<Runtime>,
    /// Extra environment for every exec (from the create request).
    pub env: BTreeMap<String, String>,
    /// Fingerprint of the create body, for idempotent creates by client id.
    pub request_fingerprint: Option<String>,
    pub warm_since_ms: Option<u64>,
    /// The selector's decision at create, returned again on an idempotent create.
    #[serde(default)]
    pub decision: Option<anvil_core::selector::Decision>,
    /// The checkpoint the sandbox's current state descends from (last taken, rolled back to
    /// or forked from; none after a reset): the parent of its next checkpoint.
    #[serde(default)]
    pub head_checkpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub checkpoint_id: String,
    pub instance_id: String,
    /// The previous checkpoint of the same instance lineage.
    pub parent: Option<String>,
    pub kind: CheckpointKind,
    pub size_bytes: u64,
    pub created_at: String,
    pub backend: BackendKind,
    pub template: Option<String>,
    pub workload_class: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub checkpoint: Checkpoint,
    pub dir: PathBuf,
}

// ---- requests ----

/// `POST /v1/instances`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub workload_class: String,
    /// Template name or id; defaults from the policy, then `[template].default`.
    #[serde(default)]
    pub template: Option<String>,
    /// Must equal the template's digest when given.
    #[serde(default)]
    pub image_digest: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Informational; recorded on the instance.
    #[serde(default)]
    pub kernel_version: Option<String>,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Environment for every exec in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Client-chosen id: the same id with the same body returns the existing instance.
    #[serde(default)]
    pub id: Option<String>,
    /// Fork: start from this checkpoint.
    #[serde(default)]
    pub from_checkpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateResponse {
    pub instance: Instance,
    pub decision: anvil_core::selector::Decision,
    pub start_path: StartPath,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes fed to the command's stdin (UTF-8 text).
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    pub timed_out: bool,
}

/// One line of a `?stream=true` exec: `{stream: stdout|stderr, data}` events, then one
/// `{stream: exit, exit_code, signal, timed_out, duration_ms}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecStreamEvent {
    pub stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Hibernate: checkpoint, then release every runtime resource (state `checkpointed`).
    #[serde(default)]
    pub stop: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckpointResponse {
    pub checkpoint_id: String,
    pub instance_id: String,
    pub kind: CheckpointKind,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// Return the sandbox to its pool as `warm` after the reset (when it has one).
    #[serde(default)]
    pub return_to_pool: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResetResponse {
    pub instance: Instance,
    pub mode: ResetMode,
    pub duration_ms: u64,
    pub returned_to_pool: bool,
    /// The fresh sandbox came from a warm instance of the same pool (the used one is
    /// destroyed in the background); false: it was reset in place.
    pub from_pool: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub checkpoint_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtlRequest {
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DestroyResponse {
    pub destroyed: bool,
    pub instance_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    pub status: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    pub key: PoolKey,
    pub stats: anvil_core::pool::PoolStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrainResponse {
    pub drained: Vec<String>,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SizingRequest {
    pub min: u32,
    pub target: u32,
    pub max: u32,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub image_digest: Option<String>,
    #[serde(default)]
    pub warm_ttl_secs: Option<u64>,
}

/// A sizing override set through the API, persisted across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSizingRecord {
    pub backend: BackendKind,
    pub workload_class: String,
    pub sizing: SizingRequest,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyView {
    pub name: String,
    pub priority: i64,
    pub workload_class: Vec<String>,
    pub backend_priority: Vec<BackendKind>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReloadResponse {
    pub reloaded: bool,
    pub policies: Vec<String>,
}

/// `POST /v1/templates`: import a root filesystem from a directory or a tarball on the host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateRequest {
    pub name: String,
    /// A directory to copy as the rootfs.
    #[serde(default)]
    pub rootfs_dir: Option<String>,
    /// A tarball (`.tar`, `.tar.gz`, `.tgz`) to unpack as the rootfs.
    #[serde(default)]
    pub rootfs_tar: Option<String>,
    /// VM templates: a kernel (ELF vmlinux), optional initramfs and rootfs image.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initramfs: Option<String>,
    #[serde(default)]
    pub rootfs_image: Option<String>,
    #[serde(default)]
    pub backend_hint: Option<BackendKind>,
    /// VM guests without an agent (e.g. the test guest): ready when this serial line appears.
    #[serde(default)]
    pub ready_marker: Option<String>,
    /// VM shape of the boot snapshot (default 1 vCPU, 128 MiB).
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateGcResponse {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackendView {
    pub backend: BackendKind,
    pub available: bool,
    pub version: Option<String>,
    pub reason: Option<String>,
    pub capabilities: anvil_core::backend::Capabilities,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CapacityView {
    pub max_instances: u64,
    pub used: u64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub backends: Vec<BackendView>,
    pub cgroup_mode: String,
    pub kvm: bool,
    pub capacity: CapacityView,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileEntryView {
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWriteResponse {
    pub path: String,
    pub bytes: u64,
}

impl ExecStreamEvent {
    fn empty(stream: &str) -> Self {
        ExecStreamEvent {
            stream: stream.to_string(),
            data: None,
            exit_code: None,
            signal: None,
            timed_out: None,
            duration_ms: None,
            error: None,
        }
    }

    pub fn data(stream: &str, bytes: &[u8]) -> Self {
        ExecStreamEvent {
            data: Some(String::from_utf8_lossy(bytes).into_owned()),
            ..Self::empty(stream)
        }
    }

    pub fn exit(
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        duration_ms: u64,
    ) -> Self {
        ExecStreamEvent {
            exit_code,
            signal,
            timed_out: Some(timed_out),
            duration_ms: Some(duration_ms),
            ..Self::empty("exit")
        }
    }

    pub fn error(message: String) -> Self {
        ExecStreamEvent {
            error: Some(message),
            ..Self::empty("error")
        }
    }
}
