//! Spare VMMs (`[pool].vmm_spares`, plain mode only): Firecracker processes started ahead of
//! time — own cgroup, private mount namespace with their directory bound at `vm_root`, API
//! socket listening — that wait for a `PUT /snapshot/load`. A restore takes one: its
//! directory is renamed to the instance's (the bind mount inside the VMM follows the
//! directory, not its name), the policy's quota is written into its cgroup, and the snapshot
//! is loaded. Process start, cgroup creation and the API socket wait leave the request path.
//!
//! Every spare lives in `<state_dir>/firecracker/spares/<name>/` with a `spare.json`
//! (pid, start time, cgroup) written once it listens; the record moves with the directory
//! into the instance, so a daemon that dies between the take and the sandbox record being
//! stored still finds what to kill (`cleanup_unstarted`). A daemon start sweeps the spares
//! directory (`activate`); a daemon stop kills the idle spares (`deactivate`).

use crate::cgroup::Cgroup;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

/// The record of one spare, next to its VM directory.
pub const RECORD: &str = "spare.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spare {
    pub name: String,
    /// `<spares>/<name>`: `vm/` (bound at `vm_root` in the VMM), `console.log`, `spare.json`.
    pub dir: PathBuf,
    pub pid: i32,
    pub start: u64,
    pub cgroup: Option<Cgroup>,
}

impl Spare {
    pub fn read(dir: &Path) -> Option<Spare> {
        let text = std::fs::read(dir.join(RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// The idle spares and the refill's state, shared by the backend and its refill task.
pub struct Spares {
    pub dir: PathBuf,
    pub want: usize,
    ready: Mutex<VecDeque<Spare>>,
    /// Set by `activate`, cleared by `deactivate`: no refills outside the daemon's life.
    active: AtomicBool,
    pub wake: Notify,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Spares {
    pub fn new(dir: PathBuf, want: usize) -> Spares {
        Spares {
            dir,
            want,
            ready: Mutex::new(VecDeque::new()),
            active: AtomicBool::new(false),
            wake: Notify::new(),
            task: Mutex::new(None),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Marks the refill active (before its task starts: the task stops when it finds it
    /// inactive) or inactive (stopping the task).
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst);
        if !on {
            if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                t.abort();
            }
        }
    }

    pub fn set_task(&self, task: tokio::task::AbortHandle) {
        if let Some(old) = self
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    pub fn idle(&self) -> usize {
        self.ready().len()
    }

    pub fn push(&self, s: Spare) {
        self.ready().push_back(s);
    }

    /// The oldest idle spare whose VMM is still the process that was started. The caller
    /// wakes the refill (`refill_soon`) once its restore is done, so starting the
    /// replacement does not compete with the snapshot load for the CPU.
    pub fn take(&self) -> Option<Spare> {
        let mut q = self.ready();
        while let Some(s) = q.pop_front() {
            if crate::procfs::same_process(s.pid, s.start) {
                return Some(s);
            }
            tracing::warn!(spare = %s.name, pid = s.pid, "spare VMM died while idle; dropping it");
        }
        None
    }

    pub fn refill_soon(&self) {
        self.wake.notify_one();
    }

    /// Every idle spare (for shutdown).
    pub fn drain(&self) -> Vec<Spare> {
        self.ready().drain(..).collect()
    }
}

use super::layout::{self, VmDir};
use super::{FcRuntime, FirecrackerBackend, StartPath};
use crate::steps::Steps;
use crate::{BackendError, InstanceSpec, Runtime};
use std::time::Duration;

/// Pause after a failed spare start before the next try (a broken binary must not spin).
const RETRY: Duration = Duration::from_secs(2);

impl FirecrackerBackend {
    /// The files of a plain-mode VMM whose directory is `dir` (its VM directory `dir/vm` is
    /// what the VMM sees at `vm_root`): a spare's, or an instance's after it took a spare.
    fn plain_fc(&self, dir: &Path, vsock: bool, cgroup: Option<Cgroup>) -> FcRuntime {
        let vm = dir.join("vm");
        FcRuntime {
            instance_dir: dir.to_path_buf(),
            api_socket: vm.join(layout::API_SOCK),
            vsock_uds: vsock.then(|| vm.join(layout::VSOCK_UDS)),
            vm_dir: vm,
            vmm_dir: self.cfg.vm_root.clone(),
            jail_dir: None,
            console_log: Some(dir.join("console.log")),
            cgroup,
            start_path: StartPath::Restore,
        }
    }

    /// Starts one spare VMM and records it; on error nothing of it is left.
    pub(super) async fn start_spare(&self) -> Result<Spare, BackendError> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("spare-{nonce:x}");
        let mut fc = self.plain_fc(&self.spares.dir.join(&name), false, None);
        let vm_dir = fc.vm();
        let mut pid = None;
        let res = self
            .start_spare_inner(&name, &vm_dir, &mut fc, &mut pid)
            .await;
        match res {
            Ok(spare) => Ok(spare),
            Err(e) => {
                let vmm = pid.and_then(|(p, start)| Some((p, start?)));
                if let Err(c) = self.teardown_fc(vmm, &fc, true).await {
                    tracing::warn!(spare = %name, error = %c, "cleanup after a failed spare start");
                }
                Err(e)
            }
        }
    }

    async fn start_spare_inner(
        &self,
        name: &str,
        vm_dir: &VmDir,
        fc: &mut FcRuntime,
        pid_out: &mut Option<(i32, Option<u64>)>,
    ) -> Result<Spare, BackendError> {
        let io = |what: String| move |e| BackendError::io(what, e);
        std::fs::create_dir_all(&vm_dir.host)
            .map_err(io(format!("create {}", vm_dir.host.display())))?;
        for f in [layout::FC_LOG, layout::METRICS] {
            super::spawn::touch(&vm_dir.host(f))
                .map_err(io(format!("create {}", vm_dir.host(f).display())))?;
        }
        let cgroups = self
            .cgroups
            .as_ref()
            .ok_or_else(|| BackendError::Other("spare VMMs need cgroups".into()))?;
        let cg = cgroups
            .create(name, &Default::default())
            .map_err(|e| BackendError::Spawn(format!("cgroup {name}: {e}")))?;
        fc.cgroup = Some(cg.clone());
        let procs = cg
            .procs_fds()
            .map_err(|e| BackendError::Spawn(format!("cgroup {name}: {e}")))?;
        let console_path = fc.console_log.clone().unwrap_or_default();
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(io(format!("open {}", console_path.display())))?;
        let mut steps = Steps::start();
        let (pid, start, _pidfd) = self
            .spawn_vmm(
                name,
                vm_dir,
                Some(console),
                Some(procs),
                fc,
                pid_out,
                &mut steps,
            )
            .await?;
        let spare = Spare {
            name: name.to_string(),
            dir: fc.instance_dir.clone(),
            pid,
            start,
            cgroup: Some(cg),
        };
        let bytes = serde_json::to_vec(&spare)
            .map_err(|e| BackendError::Other(format!("encode spare record: {e}")))?;
        std::fs::write(spare.dir.join(RECORD), bytes)
            .map_err(io(format!("write {}", spare.dir.join(RECORD).display())))?;
        tracing::debug!(spare = %name, pid, %steps, "spare VMM listening");
        Ok(spare)
    }

    /// Stops a spare's VMM and removes its cgroup and directory.
    pub(super) async fn kill_spare(&self, s: &Spare) -> Result<(), BackendError> {
        let fc = self.plain_fc(&s.dir, false, s.cgroup.clone());
        self.teardown_fc(Some((s.pid, s.start)), &fc, true).await
    }

    /// Kills whatever a previous daemon left in the spares directory (recorded spares, and
    /// half-started ones through the cgroup named after their directory).
    pub(super) async fn sweep_spares(&self) {
        let Ok(rd) = std::fs::read_dir(&self.spares.dir) else {
            return;
        };
        for e in rd.flatten() {
            let dir = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let result = match Spare::read(&dir) {
                Some(s) => self.kill_spare(&s).await,
                None => {
                    if let Some(m) = &self.cgroups {
                        if let Ok(cg) = m.open(&name) {
                            let _ = tokio::task::spawn_blocking(move || {
                                cg.kill_all().and_then(|_| cg.remove())
                            })
                            .await;
                        }
                    }
                    super::remove_tree(&dir)
                }
            };
            match result {
                Ok(()) => {
                    tracing::info!(spare = %name, "removed a spare VMM left by a previous daemon")
                }
                Err(err) => {
                    tracing::warn!(spare = %name, error = %err, "could not remove a left-over spare VMM")
                }
            }
        }
    }

    /// Keeps `want` spares started while the backend is active.
    pub(super) async fn refill_spares(self) {
        while self.spares.is_active() {
            if self.spares.idle() >= self.spares.want {
                self.spares.wake.notified().await;
                continue;
            }
            match self.start_spare().await {
                Ok(s) if self.spares.is_active() => self.spares.push(s),
                Ok(s) => {
                    let _ = self.kill_spare(&s).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "starting a spare VMM failed; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Restores `snapshot` into an idle spare for `spec`. `None` when no spare is idle; on
    /// an error the spare is gone and nothing of the instance is left.
    pub(super) async fn restore_on_spare(
        &self,
        spec: &InstanceSpec,
        vmstate: &Path,
        mem: &Path,
        vsock: bool,
    ) -> Option<Result<Runtime, BackendError>> {
        let dir = spec.instance_dir.clone();
        let vm = dir.join("vm");
        // No spares kept (jailer mode, or none configured), or a VM directory in the way.
        if self.spares.want == 0 || vm.exists() {
            return None;
        }
        let Some(spare) = self.spares.take() else {
            // None idle (or the idle ones died): make sure the refill is running.
            self.spares.refill_soon();
            return None;
        };
        let mut steps = Steps::start();
        let fc = self.plain_fc(&dir, vsock, spare.cgroup.clone());
        let rt = match Self::to_runtime(spare.pid, spare.start, &fc) {
            Ok(rt) => rt,
            Err(e) => return Some(Err(e)),
        };
        // The spare's VM directory, console log and record move into the instance directory
        // (same file system: renames; the VMM's bind mount follows the directory). The record
        // goes last: until then a daemon start sweeps the spare from its old place.
        let moved = (|| {
            std::fs::create_dir_all(&dir)?;
            std::fs::rename(spare.dir.join("vm"), &vm)?;
            std::fs::rename(spare.dir.join("console.log"), dir.join("console.log"))?;
            std::fs::rename(spare.dir.join(RECORD), dir.join(RECORD))?;
            std::fs::remove_dir(&spare.dir)
        })();
        if let Err(e) = moved {
            self.spares.refill_soon();
            let _ = self.kill_spare(&spare).await;
            let _ = super::remove_tree(&vm);
            return Some(Err(BackendError::io(
                format!("move spare {} into {}", spare.dir.display(), dir.display()),
                e,
            )));
        }
        steps.mark("take");
        let result = async {
            if let (Some(m), Some(cg)) = (&self.cgroups, &spare.cgroup) {
                m.set_quota(cg, &spec.quota)
                    .map_err(|e| BackendError::Spawn(format!("quota of spare cgroup: {e}")))?;
            }
            steps.mark("quota");
            fc.api()
                .snapshot_load(vmstate, mem, true)
                .await
                .map_err(|e| BackendError::Spawn(e.to_string()))?;
            steps.mark("snapshot_load");
            self.ready_after_restore(spec, &fc).await
        }
        .await;
        self.spares.refill_soon();
        match result {
            Ok(()) => {
                tracing::info!(id = %spec.id, pid = spare.pid, spare = %spare.name, %steps, "firecracker VM ready (spare VMM)");
                Some(Ok(rt))
            }
            Err(e) => {
                if let Err(c) = self
                    .teardown_fc(Some((spare.pid, spare.start)), &fc, true)
                    .await
                {
                    tracing::warn!(id = %spec.id, error = %c, "cleanup after a failed restore on a spare");
                }
                Some(Err(e))
            }
        }
    }
}
