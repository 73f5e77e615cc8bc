//! The manager: the one place where instance operations happen. The API layer validates and
//! calls in here; pools, the reaper and supervision call in here too.
//!
//! Concurrency: every instance has a [`Slot`] whose async mutex serialises operations on that
//! instance; the map of slots is behind a short-lived std lock. Every state change is written
//! to the store before the operation returns.

mod admin;
mod create;
mod error;
pub mod ops;
pub mod pools;
mod recovery;
/// Backend construction shared with `doctor`.
pub mod recovery_helpers {
    pub use super::recovery::{backend_settings, build_registry, find_agent};
}
mod reaper;

pub use create::template_files;
pub use error::OpError;

use crate::metrics::{Metrics, ReasonLabels};
use crate::model::{now_ms, rfc3339, CheckpointRecord, InstanceRecord};
use crate::store::Store;
use anvil_backends::registry::Registry;
use anvil_backends::{Backend, Runtime};
use anvil_core::config::Config;
use anvil_core::hooks::HookRegistry;
use anvil_core::lifecycle::{SandboxState, TerminationReason};
use anvil_core::policy::PolicySet;
use anvil_core::template::TemplateRegistry;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

/// One instance's record and the handle of its supervisor.
pub struct Slot {
    pub rec: tokio::sync::Mutex<InstanceRecord>,
    /// The instance's template id (fixed for its life), readable without the lock.
    pub template_hint: Option<String>,
    /// Bumped whenever the runtime is replaced, so a stale supervisor ignores its own exit.
    generation: AtomicU64,
    supervisor: Mutex<Option<tokio::task::AbortHandle>>,
    /// Not destroyed: counts against `[daemon].max_instances`. Readable without the record
    /// lock, so admission never waits for an operation in flight on another instance.
    live: AtomicBool,
}

impl Slot {
    fn new(rec: InstanceRecord) -> Arc<Slot> {
        let template_hint = rec.instance.template.clone();
        let live = rec.instance.state != SandboxState::Destroyed;
        Arc::new(Slot {
            rec: tokio::sync::Mutex::new(rec),
            template_hint,
            generation: AtomicU64::new(0),
            supervisor: Mutex::new(None),
            live: AtomicBool::new(live),
        })
    }

    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Frees the instance's admission slot; call once its record says destroyed.
    pub(crate) fn mark_dead(&self) {
        self.live.store(false, Ordering::SeqCst);
    }

    fn stop_supervisor(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(h) = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

pub struct Manager {
    pub cfg: Config,
    pub config_path: PathBuf,
    pub store: Store,
    pub registry: Registry,
    pub policies: ArcSwap<PolicySet>,
    pub hooks: HookRegistry,
    pub templates: RwLock<TemplateRegistry>,
    pub metrics: Metrics,
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    pub(crate) checkpoints: Mutex<HashMap<String, CheckpointRecord>>,
    /// Checkpoints an instance is being restored from right now (refuse deleting them).
    restoring: Mutex<HashMap<String, usize>>,
    pub pools: pools::Pools,
    create_permits: Semaphore,
    pub shutting_down: AtomicBool,
    pub(crate) wake_pools: Notify,
    /// Serialises policy reloads.
    reload_lock: tokio::sync::Mutex<()>,
}

impl Manager {
    pub fn state_dir(&self) -> &std::path::Path {
        &self.cfg.daemon.state_dir
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("instances").join(id)
    }

    fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("checkpoints").join(id)
    }

    pub fn slot(&self, id: &str) -> Result<Arc<Slot>, OpError> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| OpError::instance_not_found(id))
    }

    fn insert_slot(&self, id: &str, slot: Arc<Slot>) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), slot);
    }

    fn remove_slot(&self, id: &str) {
        self.slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Live (not destroyed) instances, for admission control.
    pub async fn live_count(&self) -> u64 {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.is_live())
            .count() as u64
    }

    fn backend(&self, kind: anvil_core::backend::BackendKind) -> Result<Arc<dyn Backend>, OpError> {
        self.registry
            .get_any(kind)
            .ok_or_else(|| OpError::Unavailable {
                code: "backend_unavailable",
                message: format!("backend {kind} is not configured"),
                retry_after_secs: 5,
            })
    }

    /// Writes a record; the caller holds the slot lock.
    fn persist(&self, rec: &InstanceRecord) -> Result<(), OpError> {
        self.store.put_instance(rec).map_err(OpError::internal)
    }

    /// Applies a transition to the record (in memory; the caller persists).
    fn transition(rec: &mut InstanceRecord, to: SandboxState) -> Result<(), OpError> {
        let from = rec.instance.state;
        from.transition(to).map_err(|e| {
            OpError::conflict(
                &rec.instance.id,
                format!("instance `{}`: {e}", rec.instance.id),
            )
        })?;
        rec.instance.state = to;
        rec.instance.updated_at = rfc3339(now_ms());
        Ok(())
    }

    /// Starts watching the sandbox: when it stops on its own, it is destroyed with the reason.
    fn supervise(self: &Arc<Self>, slot: &Arc<Slot>, runtime: Runtime) {
        slot.stop_supervisor();
        let gen = slot.generation.load(Ordering::SeqCst);
        let Some(backend) = self.registry.get_any(runtime.backend) else {
            return;
        };
        let me = Arc::downgrade(self);
        let s = slot.clone();
        let task = tokio::spawn(async move {
            let cause = backend.wait_exit(&runtime).await;
            let Some(me) = me.upgrade() else { return };
            if s.generation.load(Ordering::SeqCst) != gen {
                return;
            }
            let reason = match cause {
                anvil_backends::ExitCause::Exited => TerminationReason::Exited,
                anvil_backends::ExitCause::OomKilled => TerminationReason::OomKilled,
            };
            let id = s.rec.lock().await.instance.id.clone();
            warn!(instance_id = %id, reason = reason.as_str(), "sandbox stopped on its own; destroying it");
            // In a task of its own: destroy_slot aborts this supervisor task, which would
            // cancel the teardown half-way if it ran here.
            tokio::spawn(async move {
                if let Err(e) = me.destroy_slot(&s, reason, Some(gen)).await {
                    warn!(instance_id = %id, error = %e, "destroying a stopped sandbox failed");
                }
            });
        });
        *slot.supervisor.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
    }

    /// Destroys the instance in `slot` with `reason`. With `only_generation`, does nothing if
    /// the runtime has been replaced since (a stale supervisor). Idempotent.
    pub(crate) async fn destroy_slot(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        reason: TerminationReason,
        only_generation: Option<u64>,
    ) -> Result<InstanceRecord, OpError> {
        let mut rec = slot.rec.lock().await;
        if let Some(g) = only_generation {
            if slot.generation.load(Ordering::SeqCst) != g {
                return Ok(rec.clone());
            }
        }
        if rec.instance.state == SandboxState::Destroyed {
            return Ok(rec.clone());
        }
        slot.stop_supervisor();
        let id = rec.instance.id.clone();
        if let Some(rt) = rec.runtime.clone() {
            let backend = self.backend(rt.backend)?;
            if let Err(e) = backend.destroy(&rt).await {
                rec.instance.last_error = Some(format!("destroy failed: {e}"));
                let _ = self.persist(&rec);
                return Err(OpError::backend(&id, "destroy", e));
            }
        } else {
            // Hibernated or never started: only its directory may be left.
            let dir = &rec.spec.instance_dir;
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .map_err(|e| OpError::internal(format!("removing {}: {e}", dir.display())))?;
            }
        }
        if let Some(key) = &rec.instance.pool {
            self.pools.forget(key, &id);
        }
        rec.runtime = None;
        Self::transition(&mut rec, SandboxState::Destroyed)?;
        slot.mark_dead();
        let now = now_ms();
        rec.instance.termination_reason = Some(reason);
        rec.instance.destroyed_at = Some(rfc3339(now));
        rec.expires_at_ms = None;
        self.persist(&rec)?;
        self.metrics
            .instances_destroyed_total
            .get_or_create(&ReasonLabels {
                backend: rec.instance.backend.to_string(),
                reason: reason.as_str().to_string(),
            })
            .inc();
        info!(instance_id = %id, reason = reason.as_str(), "instance destroyed");
        self.wake_pools.notify_one();
        Ok(rec.clone())
    }

    pub fn checkpoint_record(&self, id: &str) -> Option<CheckpointRecord> {
        self.checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn begin_restore(&self, checkpoint_id: &str) {
        *self
            .restoring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(checkpoint_id.to_string())
            .or_default() += 1;
    }

    fn end_restore(&self, checkpoint_id: &str) {
        let mut m = self.restoring.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(checkpoint_id) {
            *n -= 1;
            if *n == 0 {
                m.remove(checkpoint_id);
            }
        }
    }
}

/// Ensures `end_restore` runs however the restore ends.
struct RestoreGuard<'a> {
    m: &'a Manager,
    id: String,
}

impl<'a> RestoreGuard<'a> {
    fn new(m: &'a Manager, id: &str) -> Self {
        m.begin_restore(id);
        RestoreGuard {
            m,
            id: id.to_string(),
        }
    }
}

impl Drop for RestoreGuard<'_> {
    fn drop(&mut self) {
        self.m.end_restore(&self.id);
    }
}
