//! The mock backend (tests only; used only when `[backends].mock` is configured), and
//! `Unimplemented`: the backend of a kind this build cannot run, which probes unavailable
//! with the reason so the selector skips it.
//!
//! A mock sandbox is real on disk, not a state flip: it is a directory under the instance dir
//! whose `fs/` holds the sandbox's files (served by the files API), with a `state.json` marking
//! it paused or running. Reset wipes `fs/`, checkpoints copy it, forks and rollbacks start from
//! a copy, destroy removes the directory. It survives a daemon restart (adopt finds the
//! directory again) and "exits" if its directory disappears from under it. It runs no process
//! and no agent, so exec answers "not supported by backend mock".

use crate::agent::AgentEndpoint;
use crate::{Backend, BackendError, CheckpointOutcome, ExitCause, InstanceSpec, Probe, Runtime};
use anvil_core::backend::{BackendKind, Capabilities, CheckpointKind, ResetMode};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct MockBackend;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MockData {
    dir: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MockState {
    paused: bool,
    generation: u64,
}

impl MockBackend {
    pub fn new() -> Self {
        MockBackend
    }

    fn data(rt: &Runtime) -> Result<MockData, BackendError> {
        serde_json::from_value(rt.data.clone())
            .map_err(|e| BackendError::Other(format!("mock runtime record is invalid: {e}")))
    }

    fn read_state(dir: &Path) -> Result<MockState, BackendError> {
        let p = dir.join("state.json");
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BackendError::Gone(format!("mock sandbox {} is gone", dir.display()))
            } else {
                BackendError::io(format!("reading {}", p.display()), e)
            }
        })?;
        serde_json::from_str(&text)
            .map_err(|e| BackendError::Other(format!("{} is corrupt: {e}", p.display())))
    }

    fn write_state(dir: &Path, st: &MockState) -> Result<(), BackendError> {
        let p = dir.join("state.json");
        let tmp = dir.join("state.json.tmp");
        let body = serde_json::to_vec(st).map_err(|e| BackendError::Other(e.to_string()))?;
        std::fs::write(&tmp, body)
            .map_err(|e| BackendError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &p)
            .map_err(|e| BackendError::io(format!("renaming {}", p.display()), e))
    }

    /// Maps a sandbox path onto `fs/`, refusing anything that would leave it.
    fn resolve(dir: &Path, path: &str) -> Result<PathBuf, BackendError> {
        if !path.starts_with('/') || path.contains('\0') {
            return Err(BackendError::Other(format!(
                "path `{path}` must be absolute"
            )));
        }
        let mut out = dir.join("fs");
        for c in Path::new(path).components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(p) => out.push(p),
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(BackendError::Other(format!(
                        "path `{path}` may not contain `..`"
                    )))
                }
            }
        }
        Ok(out)
    }

    fn running(dir: &Path) -> Result<(), BackendError> {
        if Self::read_state(dir)?.paused {
            return Err(BackendError::Other("mock sandbox is paused".into()));
        }
        Ok(())
    }

    fn fresh_fs(dir: &Path, from: Option<&Path>) -> Result<(), BackendError> {
        let fs = dir.join("fs");
        if fs.exists() {
            std::fs::remove_dir_all(&fs)
                .map_err(|e| BackendError::io(format!("removing {}", fs.display()), e))?;
        }
        match from {
            Some(src) => copy_dir(&src.join("fs"), &fs),
            None => std::fs::create_dir_all(&fs)
                .map_err(|e| BackendError::io(format!("creating {}", fs.display()), e)),
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) -> Result<(), BackendError> {
    crate::mount::copy_tree(src, dst).map_err(|e| BackendError::Other(e.to_string()))
}

fn dir_size(p: &Path) -> u64 {
    crate::mount::dir_size(p).unwrap_or(0)
}

#[async_trait]
impl Backend for MockBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Mock
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: false,
            files: true,
            pause: true,
            checkpoint_filesystem: true,
            checkpoint_memory: false,
            fork: true,
            rollback: true,
            reset_modes: vec![ResetMode::OverlayfsRollback, ResetMode::FullRecreate],
        }
    }

    async fn probe(&self) -> Probe {
        Probe::available(concat!("mock ", env!("CARGO_PKG_VERSION")))
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Runtime, BackendError> {
        // A template that names a rootfs must have it, as with a real backend: this is what
        // lets tests make creation fail on purpose (pool backoff).
        if let Some(root) = &spec.template.rootfs_dir {
            if !root.is_dir() {
                return Err(BackendError::Spawn(format!(
                    "template rootfs {} does not exist",
                    root.display()
                )));
            }
        }
        let dir = spec.instance_dir.join("mock");
        let made = (|| {
            std::fs::create_dir_all(&dir)
                .map_err(|e| BackendError::io(format!("creating {}", dir.display()), e))?;
            Self::fresh_fs(&dir, spec.from_checkpoint.as_deref())?;
            Self::write_state(&dir, &MockState::default())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&spec.instance_dir);
            return Err(e);
        }
        Ok(Runtime {
            backend: BackendKind::Mock,
            pid: None,
            pid_start_time: None,
            data: serde_json::json!({ "dir": dir }),
        })
    }

    async fn destroy(&self, rt: &Runtime) -> Result<(), BackendError> {
        let d = Self::data(rt)?;
        // The instance dir is the parent of the mock dir.
        let inst = d
            .dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(d.dir.clone());
        match std::fs::remove_dir_all(&inst) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io(format!("removing {}", inst.display()), e)),
        }
    }

    async fn pause(&self, rt: &Runtime) -> Result<(), BackendError> {
        let d = Self::data(rt)?;
        let mut st = Self::read_state(&d.dir)?;
        st.paused = true;
        Self::write_state(&d.dir, &st)
    }

    async fn resume(&self, rt: &Runtime) -> Result<(), BackendError> {
        let d = Self::data(rt)?;
        let mut st = Self::read_state(&d.dir)?;
        st.paused = false;
        Self::write_state(&d.dir, &st)
    }

    async fn reset(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        mode: ResetMode,
    ) -> Result<Runtime, BackendError> {
        match mode {
            ResetMode::OverlayfsRollback => {
                let d = Self::data(rt)?;
                let mut st = Self::read_state(&d.dir)?;
                Self::fresh_fs(&d.dir, None)?;
                st.paused = false;
                st.generation += 1;
                Self::write_state(&d.dir, &st)?;
                Ok(rt.clone())
            }
            ResetMode::FullRecreate => crate::recreate(self, rt, spec).await,
            ResetMode::MmTemplate => Err(BackendError::Unsupported {
                backend: BackendKind::Mock,
                op: "reset mm-template",
            }),
        }
    }

    async fn checkpoint(
        &self,
        rt: &Runtime,
        dir: &Path,
    ) -> Result<CheckpointOutcome, BackendError> {
        let d = Self::data(rt)?;
        Self::read_state(&d.dir)?;
        copy_dir(&d.dir.join("fs"), &dir.join("fs"))?;
        Ok(CheckpointOutcome {
            kind: CheckpointKind::Filesystem,
            size_bytes: dir_size(dir),
        })
    }

    async fn rollback(
        &self,
        rt: &Runtime,
        _spec: &InstanceSpec,
        dir: &Path,
    ) -> Result<Runtime, BackendError> {
        let d = Self::data(rt)?;
        let mut st = Self::read_state(&d.dir)?;
        Self::fresh_fs(&d.dir, Some(dir))?;
        st.paused = false;
        Self::write_state(&d.dir, &st)?;
        Ok(rt.clone())
    }

    fn agent_endpoint(&self, _rt: &Runtime) -> Option<AgentEndpoint> {
        None
    }

    async fn wait_exit(&self, rt: &Runtime) -> ExitCause {
        let Ok(d) = Self::data(rt) else {
            return ExitCause::Exited;
        };
        // The mock has no process; its "process" is its directory.
        loop {
            if !d.dir.join("state.json").exists() {
                return ExitCause::Exited;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn adopt(&self, rt: &Runtime) -> Result<bool, BackendError> {
        let d = Self::data(rt)?;
        if Self::read_state(&d.dir).is_ok() {
            return Ok(true);
        }
        self.destroy(rt).await?;
        Ok(false)
    }

    async fn read_file(&self, rt: &Runtime, path: &str) -> Result<Vec<u8>, BackendError> {
        let d = Self::data(rt)?;
        Self::running(&d.dir)?;
        let p = Self::resolve(&d.dir, path)?;
        std::fs::read(&p).map_err(|e| BackendError::io(format!("reading {path}"), e))
    }

    async fn write_file(
        &self,
        rt: &Runtime,
        path: &str,
        data: &[u8],
        _mode: u32,
    ) -> Result<(), BackendError> {
        let d = Self::data(rt)?;
        Self::running(&d.dir)?;
        let p = Self::resolve(&d.dir, path)?;
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| BackendError::io(format!("creating parent of {path}"), e))?;
        }
        std::fs::write(&p, data).map_err(|e| BackendError::io(format!("writing {path}"), e))
    }
}

/// A kind anvil knows by name but has no implementation of in this build.
pub struct Unimplemented {
    kind: BackendKind,
    reason: String,
}

impl Unimplemented {
    pub fn new(kind: BackendKind, _binary: PathBuf) -> Self {
        Unimplemented {
            kind,
            reason: format!("backend {kind} has no implementation in this build of anvil"),
        }
    }

    /// A backend whose construction failed: it probes unavailable with that reason.
    pub fn broken(kind: BackendKind, reason: String) -> Self {
        Unimplemented { kind, reason }
    }

    fn unsupported(&self, op: &'static str) -> BackendError {
        BackendError::Unsupported {
            backend: self.kind,
            op,
        }
    }
}

#[async_trait]
impl Backend for Unimplemented {
    fn kind(&self) -> BackendKind {
        self.kind
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn probe(&self) -> Probe {
        Probe::unavailable(self.reason.clone())
    }
    async fn create(&self, _spec: &InstanceSpec) -> Result<Runtime, BackendError> {
        Err(self.unsupported("create"))
    }
    async fn destroy(&self, _rt: &Runtime) -> Result<(), BackendError> {
        Err(self.unsupported("destroy"))
    }
    async fn pause(&self, _rt: &Runtime) -> Result<(), BackendError> {
        Err(self.unsupported("pause"))
    }
    async fn resume(&self, _rt: &Runtime) -> Result<(), BackendError> {
        Err(self.unsupported("resume"))
    }
    async fn reset(
        &self,
        _rt: &Runtime,
        _spec: &InstanceSpec,
        _mode: ResetMode,
    ) -> Result<Runtime, BackendError> {
        Err(self.unsupported("reset"))
    }
    async fn checkpoint(
        &self,
        _rt: &Runtime,
        _dir: &Path,
    ) -> Result<CheckpointOutcome, BackendError> {
        Err(self.unsupported("checkpoint"))
    }
    async fn rollback(
        &self,
        _rt: &Runtime,
        _spec: &InstanceSpec,
        _dir: &Path,
    ) -> Result<Runtime, BackendError> {
        Err(self.unsupported("rollback"))
    }
    fn agent_endpoint(&self, _rt: &Runtime) -> Option<AgentEndpoint> {
        None
    }
    async fn wait_exit(&self, _rt: &Runtime) -> ExitCause {
        std::future::pending().await
    }
    async fn adopt(&self, _rt: &Runtime) -> Result<bool, BackendError> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> InstanceSpec {
        InstanceSpec {
            id: "m1".into(),
            instance_dir: dir.join("m1"),
            cgroup_name: "m1".into(),
            template: Default::default(),
            quota: Default::default(),
            network: false,
            env: Default::default(),
            vm: None,
            from_checkpoint: None,
        }
    }

    #[tokio::test]
    async fn lifecycle_is_real_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let b = MockBackend::new();
        let s = spec(tmp.path());
        let rt = b.create(&s).await.unwrap();
        b.write_file(&rt, "/etc/x", b"hello", 0o644).await.unwrap();
        assert_eq!(b.read_file(&rt, "/etc/x").await.unwrap(), b"hello");
        assert!(b.read_file(&rt, "/../../etc/passwd").await.is_err());

        let ck = tmp.path().join("ck");
        let out = b.checkpoint(&rt, &ck).await.unwrap();
        assert_eq!(out.size_bytes, 5);

        b.pause(&rt).await.unwrap();
        assert!(
            b.read_file(&rt, "/etc/x").await.is_err(),
            "paused sandbox serves no files"
        );
        b.resume(&rt).await.unwrap();

        let rt = b
            .reset(&rt, &s, ResetMode::OverlayfsRollback)
            .await
            .unwrap();
        assert!(
            b.read_file(&rt, "/etc/x").await.is_err(),
            "reset wipes files"
        );
        let rt = b.rollback(&rt, &s, &ck).await.unwrap();
        assert_eq!(b.read_file(&rt, "/etc/x").await.unwrap(), b"hello");

        assert!(b.adopt(&rt).await.unwrap());
        b.destroy(&rt).await.unwrap();
        assert!(!s.instance_dir.exists());
        assert!(!b.adopt(&rt).await.unwrap());
        b.destroy(&rt).await.unwrap(); // idempotent
    }
}
