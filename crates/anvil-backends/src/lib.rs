//! Isolation backends for anvil.
//!
//! Every backend is one module behind the [`Backend`] trait. Backends never see HTTP or
//! policies: the daemon resolves a policy into an [`InstanceSpec`] and hands it over. What a
//! backend needs to find an instance again (pids, paths, cgroup) is its [`Runtime`], which the
//! daemon persists and hands back on every call and after a restart.
//!
//! Adding a backend = one module implementing [`Backend`] + one line in [`registry`].

pub mod agent;
pub mod bubblewrap;
pub mod cgroup;
pub mod firecracker;
pub mod mock;
pub mod mount;
pub mod procfs;
pub mod registry;
pub mod spec;
pub mod steps;

pub use spec::*;

use anvil_core::backend::{BackendKind, Capabilities, CheckpointKind, ResetMode};
use async_trait::async_trait;
use std::path::Path;

/// Reset `full-recreate` for any backend: destroy, then create from the template (never
/// from a checkpoint: a reset goes back to the template).
pub async fn recreate<B: Backend + ?Sized>(
    b: &B,
    rt: &Runtime,
    spec: &InstanceSpec,
) -> Result<Runtime, BackendError> {
    b.destroy(rt).await?;
    let mut fresh = spec.clone();
    fresh.from_checkpoint = None;
    b.create(&fresh).await
}

/// Result of probing a backend at daemon start.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    pub available: bool,
    pub version: Option<String>,
    /// Why it is unavailable (or a note when available).
    pub reason: Option<String>,
}

impl Probe {
    pub fn available(version: impl Into<String>) -> Self {
        Probe {
            available: true,
            version: Some(version.into()),
            reason: None,
        }
    }
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Probe {
            available: false,
            version: None,
            reason: Some(reason.into()),
        }
    }
}

/// Errors from backend operations. Each names the operation's cause.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("operation `{op}` is not supported by backend {backend}")]
    Unsupported {
        backend: BackendKind,
        op: &'static str,
    },
    #[error("sandbox is gone: {0}")]
    Gone(String),
    #[error("spawn failed: {0}")]
    Spawn(String),
    #[error("agent: {0}")]
    Agent(#[from] agent::AgentError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Why a sandbox stopped on its own (supervision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// Its processes exited (or were killed from outside).
    Exited,
    /// The kernel's OOM killer fired in its cgroup.
    OomKilled,
}

/// Outcome of a checkpoint written into the directory the daemon chose.
#[derive(Debug, Clone)]
pub struct CheckpointOutcome {
    pub kind: CheckpointKind,
    pub size_bytes: u64,
}

/// One isolation mechanism. All methods must be idempotent where it makes sense (destroy of
/// an already-destroyed runtime succeeds) and must not leave anything behind on error:
/// a failed `create` has removed whatever it had set up.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;
    fn capabilities(&self) -> Capabilities;
    /// Checks binaries, versions, devices. Called once at start (and by `doctor`).
    async fn probe(&self) -> Probe;

    /// Creates and starts a sandbox; returns once its agent is ready.
    async fn create(&self, spec: &InstanceSpec) -> Result<Runtime, BackendError>;
    /// Tears everything down: processes, cgroup, mounts, sockets, the instance directory.
    async fn destroy(&self, rt: &Runtime) -> Result<(), BackendError>;

    async fn pause(&self, rt: &Runtime) -> Result<(), BackendError>;
    async fn resume(&self, rt: &Runtime) -> Result<(), BackendError>;

    /// Brings the sandbox back to its template state with `mode`; may return a new runtime.
    async fn reset(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        mode: ResetMode,
    ) -> Result<Runtime, BackendError>;

    /// Writes a checkpoint of the sandbox into `dir` (created by the daemon, empty).
    async fn checkpoint(&self, rt: &Runtime, dir: &Path)
        -> Result<CheckpointOutcome, BackendError>;

    /// Restores this sandbox in place to the checkpoint in `dir`.
    async fn rollback(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        dir: &Path,
    ) -> Result<Runtime, BackendError>;

    /// Where the guest agent of this sandbox listens, if the backend runs one.
    fn agent_endpoint(&self, rt: &Runtime) -> Option<agent::AgentEndpoint>;

    /// Resolves when the sandbox stops on its own. Must be cancel-safe (the daemon drops it
    /// on destroy).
    async fn wait_exit(&self, rt: &Runtime) -> ExitCause;

    /// After a daemon restart: is this runtime still alive and the same sandbox (pid + start
    /// time)? If not, the backend cleans up what is left and returns false.
    async fn adopt(&self, rt: &Runtime) -> Result<bool, BackendError>;

    /// After a daemon restart: removes whatever a create that never finished (so no runtime
    /// was recorded) left under the spec's names — processes in its cgroup, mounts, sockets,
    /// the instance directory. Idempotent. The default removes the instance directory.
    async fn cleanup_unstarted(&self, spec: &InstanceSpec) -> Result<(), BackendError> {
        match std::fs::remove_dir_all(&spec.instance_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io(
                format!("remove {}", spec.instance_dir.display()),
                e,
            )),
        }
    }

    /// The daemon owns this backend from now on (not called by one-shot tools such as
    /// `doctor`): clean up what a previous daemon left outside any sandbox record and start
    /// background work. The default has none.
    async fn activate(&self) {}

    /// The daemon is stopping: release what `activate` started (sandboxes are not touched).
    async fn deactivate(&self) {}

    /// Prepares what a template needs on this backend before it can serve (a VM boot
    /// snapshot), writing into `dir`. Returns the snapshot directory if one was made. The
    /// default has nothing to prepare.
    async fn prepare_template(
        &self,
        _template: &TemplateFiles,
        _vm: &VmSpec,
        _dir: &Path,
    ) -> Result<Option<std::path::PathBuf>, BackendError> {
        Ok(None)
    }

    /// Files in the sandbox for backends without an agent (mock); the default says unsupported.
    async fn read_file(&self, _rt: &Runtime, _path: &str) -> Result<Vec<u8>, BackendError> {
        Err(BackendError::Unsupported {
            backend: self.kind(),
            op: "files",
        })
    }
    async fn write_file(
        &self,
        _rt: &Runtime,
        _path: &str,
        _data: &[u8],
        _mode: u32,
    ) -> Result<(), BackendError> {
        Err(BackendError::Unsupported {
            backend: self.kind(),
            op: "files",
        })
    }
}
