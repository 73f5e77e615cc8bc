//! bubblewrap backend: an overlay root (template + per-instance upper layer) mounted by the
//! daemon, bwrap with every namespace unshared and all capabilities dropped, the guest agent
//! as pid 1, one cgroup per sandbox (quota, freezer, kill, OOM count).
//!
//! bwrap runs in its own session, outside the daemon's process group and without
//! `--die-with-parent`, so sandboxes survive a daemon restart and are re-adopted through
//! the persisted [`Runtime`] (pid + start time, paths, cgroup).

mod layout;
mod process;
mod spawn;

pub use layout::BwrapData;

use crate::agent::{AgentClient, AgentEndpoint};
use crate::cgroup::{CgroupConfig, CgroupManager};
use crate::mount;
use crate::steps::Steps;
use crate::{Backend, BackendError, CheckpointOutcome, ExitCause, InstanceSpec, Probe, Runtime};
use anvil_core::backend::{BackendKind, Capabilities, CheckpointKind, ResetMode};
use async_trait::async_trait;
use process::Pidfd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often supervision checks the cgroup's OOM counter.
const OOM_POLL: Duration = Duration::from_millis(250);
/// How long to wait for bwrap to go away after everything in its cgroup was killed.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// Agent health timeout during adoption.
const ADOPT_HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of the bubblewrap backend.
#[derive(Debug, Clone)]
pub struct BwrapConfig {
    /// The `bwrap` binary (e.g. `/usr/bin/bwrap`).
    pub bwrap: PathBuf,
    /// The static `anvil-agent` binary, bind-mounted read-only into every sandbox.
    pub agent: PathBuf,
    /// Where sandbox cgroups go (root name, optional base override).
    pub cgroups: CgroupConfig,
    /// How long `create`/`reset` wait for the agent's ready notification.
    pub ready_timeout: Duration,
}

impl Default for BwrapConfig {
    fn default() -> Self {
        BwrapConfig {
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            agent: PathBuf::from("/usr/local/lib/anvil/anvil-agent"),
            cgroups: CgroupConfig::default(),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

pub struct BubblewrapBackend {
    cfg: BwrapConfig,
    /// The detected cgroup layout, or why cgroups cannot be used (reported by `probe`).
    cgroups: Result<Arc<CgroupManager>, String>,
}

impl BubblewrapBackend {
    /// Never fails: problems (no cgroups, missing binaries) are reported by [`Backend::probe`]
    /// and by the operations themselves.
    pub fn new(cfg: BwrapConfig) -> Self {
        let cgroups = CgroupManager::new(&cfg.cgroups)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        BubblewrapBackend { cfg, cgroups }
    }

    /// Same, sharing an already detected cgroup manager.
    pub fn with_cgroups(cfg: BwrapConfig, cgroups: Arc<CgroupManager>) -> Self {
        BubblewrapBackend {
            cfg,
            cgroups: Ok(cgroups),
        }
    }

    pub fn config(&self) -> &BwrapConfig {
        &self.cfg
    }

    fn cgroups(&self) -> Result<&Arc<CgroupManager>, BackendError> {
        self.cgroups
            .as_ref()
            .map_err(|e| BackendError::Other(format!("cgroups unusable: {e}")))
    }

    fn data(rt: &Runtime) -> Result<BwrapData, BackendError> {
        if rt.backend != BackendKind::Bubblewrap {
            return Err(BackendError::Other(format!(
                "runtime of backend {} handed to bubblewrap",
                rt.backend
            )));
        }
        serde_json::from_value(rt.data.clone())
            .map_err(|e| BackendError::Other(format!("bubblewrap runtime record unreadable: {e}")))
    }

    fn runtime(
        data: &BwrapData,
        pid: i32,
        start_time: Option<u64>,
    ) -> Result<Runtime, BackendError> {
        Ok(Runtime {
            backend: BackendKind::Bubblewrap,
            pid: Some(pid),
            pid_start_time: start_time,
            data: serde_json::to_value(data)
                .map_err(|e| BackendError::Other(format!("serialize bubblewrap runtime: {e}")))?,
        })
    }

    /// Prepares upper/ (empty, or a copy of `from_checkpoint/upper`), work/, rootfs/, run/
    /// and mounts the overlay.
    async fn prepare_fs(
        &self,
        data: &BwrapData,
        spec: &InstanceSpec,
        from: Option<&Path>,
    ) -> Result<(), BackendError> {
        let lower = spec.template.rootfs_dir.clone().ok_or_else(|| {
            BackendError::Other(format!(
                "template {} has no rootfs directory",
                spec.template.id
            ))
        })?;
        if !lower.is_dir() {
            return Err(BackendError::Other(format!(
                "template rootfs {} is not a directory",
                lower.display()
            )));
        }
        let data = data.clone();
        let from = from.map(Path::to_path_buf);
        blocking(move || {
            for d in [&data.instance_dir, &data.rootfs, &data.run_dir] {
                std::fs::create_dir_all(d)
                    .map_err(|e| BackendError::io(format!("create {}", d.display()), e))?;
            }
            for d in [&data.upper, &data.work] {
                remove_dir_if_present(d)?;
                std::fs::create_dir(d)
                    .map_err(|e| BackendError::io(format!("create {}", d.display()), e))?;
            }
            if let Some(cp) = from {
                let src = cp.join("upper");
                if !src.is_dir() {
                    return Err(BackendError::Other(format!(
                        "checkpoint {} has no upper/ layer",
                        cp.display()
                    )));
                }
                mount::copy_tree(&src, &data.upper)
                    .map_err(|e| BackendError::Other(e.to_string()))?;
            }
            mount::mount_overlay(&lower, &data.upper, &data.work, &data.rootfs)
                .map_err(|e| BackendError::Other(e.to_string()))
        })
        .await
    }

    /// Kills everything in the cgroup and waits for bwrap to be gone (and reaped if ours).
    async fn stop_processes(
        &self,
        data: &BwrapData,
        pid: Option<i32>,
        start_time: Option<u64>,
    ) -> Result<(), BackendError> {
        // Open the pidfd before killing so the pid cannot be reused under us.
        let pidfd = match pid.map(|p| (p, Pidfd::open(p, start_time))) {
            Some((_, Ok(fd))) => fd,
            // Killing the cgroup below still stops it; only the wait for it is lost.
            Some((p, Err(e))) => {
                tracing::warn!(pid = p, error = %e, "pidfd_open failed");
                None
            }
            None => None,
        };
        let cg = data.cgroup.clone();
        blocking(move || {
            cg.kill_all()
                .map_err(|e| BackendError::Other(format!("kill sandbox processes: {e}")))
        })
        .await?;
        if let Some(pfd) = pidfd {
            if !pfd.exited_within(EXIT_WAIT).await {
                // Not in the cgroup (should not happen): kill it directly.
                tracing::warn!(
                    pid = pfd.pid(),
                    "bwrap survived cgroup kill; sending SIGKILL"
                );
                pfd.kill();
                if !pfd.exited_within(EXIT_WAIT).await {
                    return Err(BackendError::Other(format!(
                        "bwrap pid {} does not exit",
                        pfd.pid()
                    )));
                }
            }
            pfd.reap();
        }
        Ok(())
    }

    /// Removes everything of an instance; every step runs even if an earlier one failed.
    async fn teardown(
        &self,
        data: &BwrapData,
        pid: Option<i32>,
        start_time: Option<u64>,
    ) -> Result<(), BackendError> {
        let mut first: Option<BackendError> = None;
        if let Err(e) = self.stop_processes(data, pid, start_time).await {
            first.get_or_insert(e);
        }
        let d = data.clone();
        let fs = blocking(move || {
            mount::unmount(&d.rootfs).map_err(|e| BackendError::Other(e.to_string()))?;
            let cg_result = d
                .cgroup
                .remove()
                .map_err(|e| BackendError::Other(format!("remove cgroup: {e}")));
            // Never recurse into a still-mounted root: that would delete through the overlay.
            if mount::is_mounted(&d.rootfs).map_err(|e| BackendError::Other(e.to_string()))? {
                return Err(BackendError::Other(format!(
                    "{} is still mounted",
                    d.rootfs.display()
                )));
            }
            remove_dir_if_present(&d.instance_dir)?;
            cg_result
        })
        .await;
        if let Err(e) = fs {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Starts bwrap into the instance's cgroup and waits for the agent; returns the runtime.
    async fn start(
        &self,
        mut data: BwrapData,
        spec: &InstanceSpec,
        steps: &mut Steps,
    ) -> Result<Runtime, BackendError> {
        data.oom_base = data.cgroup.oom_kills().unwrap_or(0);
        let (pid, start_time) = spawn::spawn_and_wait(&self.cfg, &data, spec, steps).await?;
        Self::runtime(&data, pid, start_time)
    }

    /// Turns a failed create/reset into a clean slate plus a Spawn error with the console tail.
    async fn fail(
        &self,
        data: &BwrapData,
        pid: Option<i32>,
        start_time: Option<u64>,
        what: &str,
        err: BackendError,
    ) -> BackendError {
        let console = layout::tail(&data.console_log(), 2048);
        // A full filesystem leaves the console empty too: say so, or the error names nothing.
        let space = full_filesystem_note(&data.instance_dir);
        if let Err(e) = self.teardown(data, pid, start_time).await {
            tracing::error!(instance = %data.instance_dir.display(), error = %e, "cleanup after failed {what} incomplete");
        }
        let reason = match err {
            BackendError::Spawn(s) => s,
            other => other.to_string(),
        };
        BackendError::Spawn(format!("{what}: {reason}; console: {console}{space}"))
    }

    async fn create_from(
        &self,
        spec: &InstanceSpec,
        from: Option<&Path>,
    ) -> Result<Runtime, BackendError> {
        let started = Instant::now();
        let mgr = self.cgroups()?.clone();
        let cgroup = mgr
            .open(&spec.cgroup_name)
            .map_err(|e| BackendError::Spawn(e.to_string()))?;
        let data = BwrapData::new(&spec.instance_dir, cgroup);
        let agent_sock_len = data.agent_socket.as_os_str().len();
        if agent_sock_len > layout::MAX_SOCKET_PATH {
            return Err(BackendError::Spawn(format!(
                "socket path {} is {agent_sock_len} bytes, over the {} byte limit of Unix sockets; use a shorter state_dir",
                data.agent_socket.display(),
                layout::MAX_SOCKET_PATH
            )));
        }
        let mut steps = Steps::start();
        let result = async {
            self.prepare_fs(&data, spec, from).await?;
            steps.mark("overlay");
            let (name, quota) = (spec.cgroup_name.clone(), spec.quota.clone());
            let cgroup = blocking(move || {
                mgr.create(&name, &quota)
                    .map_err(|e| BackendError::Other(format!("create cgroup: {e}")))
            })
            .await?;
            steps.mark("cgroup");
            let mut data = data.clone();
            data.cgroup = cgroup;
            self.start(data, spec, &mut steps).await
        }
        .await;
        match result {
            Ok(rt) => {
                tracing::info!(id = %spec.id, pid = ?rt.pid, took_ms = started.elapsed().as_millis() as u64, %steps, "bwrap sandbox ready");
                Ok(rt)
            }
            Err(e) => Err(self.fail(&data, None, None, "create", e).await),
        }
    }

    /// overlayfs-rollback (and rollback to a checkpoint): same cgroup, fresh upper layer.
    async fn restart_with(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        from: Option<&Path>,
    ) -> Result<Runtime, BackendError> {
        let started = Instant::now();
        let data = Self::data(rt)?;
        let mut steps = Steps::start();
        let result = async {
            self.stop_processes(&data, rt.pid, rt.pid_start_time)
                .await?;
            steps.mark("kill");
            let d = data.clone();
            blocking(move || {
                mount::unmount(&d.rootfs).map_err(|e| BackendError::Other(e.to_string()))
            })
            .await?;
            steps.mark("unmount");
            self.prepare_fs(&data, spec, from).await?;
            steps.mark("overlay");
            self.start(data.clone(), spec, &mut steps).await
        }
        .await;
        match result {
            Ok(new_rt) => {
                tracing::info!(id = %spec.id, took_ms = started.elapsed().as_millis() as u64, %steps, "bwrap sandbox restarted");
                Ok(new_rt)
            }
            // The old process is gone by now (or is being killed again by teardown).
            Err(e) => Err(self
                .fail(&data, rt.pid, rt.pid_start_time, "reset", e)
                .await),
        }
    }
}

#[async_trait]
impl Backend for BubblewrapBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Bubblewrap
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: true,
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
        if !nix::unistd::Uid::effective().is_root() {
            return Probe::unavailable("bubblewrap backend needs root (overlay mounts, cgroups)");
        }
        if !self.cfg.bwrap.is_file() {
            return Probe::unavailable(format!("bwrap not found at {}", self.cfg.bwrap.display()));
        }
        let version = match tokio::process::Command::new(&self.cfg.bwrap)
            .arg("--version")
            .output()
            .await
        {
            Ok(out) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            }
            Ok(out) => {
                return Probe::unavailable(format!(
                    "`{} --version` failed ({}): {}",
                    self.cfg.bwrap.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Err(e) => {
                return Probe::unavailable(format!("cannot run {}: {e}", self.cfg.bwrap.display()))
            }
        };
        if !self.cfg.agent.is_file() {
            return Probe::unavailable(format!(
                "guest agent binary not found at {} (build it with scripts/build-agent.sh)",
                self.cfg.agent.display()
            ));
        }
        match std::fs::read_to_string("/proc/filesystems") {
            Ok(fs)
                if fs
                    .lines()
                    .any(|l| l.split_whitespace().last() == Some("overlay")) => {}
            Ok(_) => return Probe::unavailable("kernel has no overlay filesystem"),
            Err(e) => return Probe::unavailable(format!("read /proc/filesystems: {e}")),
        }
        let mgr = match &self.cgroups {
            Ok(m) => m.clone(),
            Err(e) => return Probe::unavailable(format!("cgroups unusable: {e}")),
        };
        if let Err(e) = blocking(move || {
            mgr.check_usable()
                .map_err(|e| BackendError::Other(e.to_string()))
        })
        .await
        {
            return Probe::unavailable(format!("cgroups unusable: {e}"));
        }
        Probe::available(version)
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Runtime, BackendError> {
        self.create_from(spec, spec.from_checkpoint.as_deref())
            .await
    }

    async fn destroy(&self, rt: &Runtime) -> Result<(), BackendError> {
        let data = Self::data(rt)?;
        self.teardown(&data, rt.pid, rt.pid_start_time).await
    }

    async fn pause(&self, rt: &Runtime) -> Result<(), BackendError> {
        let cg = Self::data(rt)?.cgroup;
        blocking(move || {
            cg.freeze()
                .map_err(|e| BackendError::Other(format!("freeze: {e}")))
        })
        .await
    }

    async fn resume(&self, rt: &Runtime) -> Result<(), BackendError> {
        let cg = Self::data(rt)?.cgroup;
        blocking(move || {
            cg.thaw()
                .map_err(|e| BackendError::Other(format!("thaw: {e}")))
        })
        .await
    }

    async fn reset(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        mode: ResetMode,
    ) -> Result<Runtime, BackendError> {
        match mode {
            // A fork resets to the checkpoint it started from: that is its "template".
            ResetMode::OverlayfsRollback => {
                self.restart_with(rt, spec, spec.from_checkpoint.as_deref())
                    .await
            }
            ResetMode::FullRecreate => crate::recreate(self, rt, spec).await,
            ResetMode::MmTemplate => Err(BackendError::Unsupported {
                backend: BackendKind::Bubblewrap,
                op: "reset mm-template",
            }),
        }
    }

    async fn checkpoint(
        &self,
        rt: &Runtime,
        dir: &Path,
    ) -> Result<CheckpointOutcome, BackendError> {
        let data = Self::data(rt)?;
        let dst = dir.join("upper");
        blocking(move || {
            // A sandbox the user paused stays paused afterwards.
            let was_frozen = data.cgroup.is_frozen().unwrap_or(false);
            data.cgroup
                .freeze()
                .map_err(|e| BackendError::Other(format!("freeze for checkpoint: {e}")))?;
            let copied =
                mount::copy_tree(&data.upper, &dst).map_err(|e| BackendError::Other(e.to_string()));
            if !was_frozen {
                data.cgroup
                    .thaw()
                    .map_err(|e| BackendError::Other(format!("thaw after checkpoint: {e}")))?;
            }
            copied?;
            let size_bytes =
                mount::dir_size(&dst).map_err(|e| BackendError::Other(e.to_string()))?;
            Ok(CheckpointOutcome {
                kind: CheckpointKind::Filesystem,
                size_bytes,
            })
        })
        .await
    }

    async fn rollback(
        &self,
        rt: &Runtime,
        spec: &InstanceSpec,
        dir: &Path,
    ) -> Result<Runtime, BackendError> {
        self.restart_with(rt, spec, Some(dir)).await
    }

    fn agent_endpoint(&self, rt: &Runtime) -> Option<AgentEndpoint> {
        Self::data(rt)
            .ok()
            .map(|d| AgentEndpoint::Unix(d.agent_socket))
    }

    async fn wait_exit(&self, rt: &Runtime) -> ExitCause {
        let Ok(data) = Self::data(rt) else {
            return ExitCause::Exited;
        };
        let Some(pid) = rt.pid else {
            return ExitCause::Exited;
        };
        let oom_grew = || {
            data.cgroup
                .oom_kills()
                .map(|n| n > data.oom_base)
                .unwrap_or(false)
        };
        let pidfd = match Pidfd::open(pid, rt.pid_start_time) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return if oom_grew() {
                    ExitCause::OomKilled
                } else {
                    ExitCause::Exited
                }
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "pidfd_open failed; supervising through /proc");
                loop {
                    if oom_grew() {
                        return ExitCause::OomKilled;
                    }
                    if !process::same_running_process(pid, rt.pid_start_time) {
                        return ExitCause::Exited;
                    }
                    tokio::time::sleep(OOM_POLL).await;
                }
            }
        };
        let mut tick = tokio::time::interval(OOM_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = pidfd.exited() => {
                    // The agent itself may have been the OOM victim.
                    return if oom_grew() { ExitCause::OomKilled } else { ExitCause::Exited };
                }
                _ = tick.tick() => {
                    if oom_grew() {
                        return ExitCause::OomKilled;
                    }
                }
            }
        }
    }

    async fn adopt(&self, rt: &Runtime) -> Result<bool, BackendError> {
        let data = Self::data(rt)?;
        let alive = rt
            .pid
            .is_some_and(|pid| process::same_running_process(pid, rt.pid_start_time));
        if alive && data.cgroup.is_frozen().unwrap_or(false) {
            // A paused sandbox's agent cannot answer; pid + start time identify it.
            return Ok(true);
        }
        if alive {
            let client = AgentClient::new(AgentEndpoint::Unix(data.agent_socket.clone()))
                .with_timeout(ADOPT_HEALTH_TIMEOUT);
            match client.health().await {
                Ok(_) => return Ok(true),
                Err(e) => {
                    tracing::warn!(instance = %data.instance_dir.display(), error = %e, "agent unhealthy at adoption")
                }
            }
        }
        self.teardown(&data, rt.pid, rt.pid_start_time).await?;
        Ok(false)
    }

    async fn cleanup_unstarted(&self, spec: &InstanceSpec) -> Result<(), BackendError> {
        // bwrap may already run in the cgroup (the daemon died while waiting for the agent);
        // teardown kills the cgroup, unmounts the overlay, removes the cgroup and the dir.
        let cgroup = self
            .cgroups()?
            .open(&spec.cgroup_name)
            .map_err(|e| BackendError::Other(format!("cgroup {}: {e}", spec.cgroup_name)))?;
        let data = BwrapData::new(&spec.instance_dir, cgroup);
        self.teardown(&data, None, None).await
    }
}

/// "; No space left on device: …" when the filesystem holding `dir` has (almost) no room.
fn full_filesystem_note(dir: &Path) -> String {
    const LOW: u64 = 1 << 20;
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            if free < LOW {
                format!(
                    "; No space left on device: the filesystem of {} has {free} bytes free",
                    dir.display()
                )
            } else {
                String::new()
            }
        }
        Err(_) => String::new(),
    }
}

/// Runs blocking file-system/cgroup work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Other(format!("blocking task failed: {e}")))?
}

fn remove_dir_if_present(d: &Path) -> Result<(), BackendError> {
    match std::fs::remove_dir_all(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io(format!("remove {}", d.display()), e)),
    }
}
