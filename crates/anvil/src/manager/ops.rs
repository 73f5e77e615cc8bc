//! Operations on existing instances: destroy, pause/resume, reset, checkpoint, rollback, TTL,
//! exec and files.

use super::{Manager, OpError, RestoreGuard, Slot};
use crate::metrics::{BackendLabels, ModeLabels};
use crate::model::InstanceRecord;
use crate::model::{
    now_ms, rfc3339, Checkpoint, CheckpointRecord, CheckpointResponse, ExecRequest, ExecResponse,
    Instance, ResetResponse,
};
use anvil_backends::agent::{AgentClient, ExecEvent, ExecStream};
use anvil_core::backend::BackendKind;
use anvil_core::lifecycle::{SandboxState, TerminationReason};
use anvil_core::pool::PoolKey;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Largest output a non-streaming exec returns per stream; beyond it the output is cut and
/// the caller is told to stream instead.
const MAX_COLLECTED_OUTPUT: usize = 16 << 20;

pub struct ExecTarget {
    pub client: AgentClient,
    pub backend: BackendKind,
    pub id: String,
    pub env: std::collections::BTreeMap<String, String>,
}

impl Manager {
    pub async fn get(&self, id: &str) -> Result<Instance, OpError> {
        Ok(self.slot(id)?.rec.lock().await.instance.clone())
    }

    pub async fn list(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for s in self.all_slots() {
            out.push(s.rec.lock().await.instance.clone());
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        out
    }

    pub async fn destroy(
        self: &Arc<Self>,
        id: &str,
        reason: TerminationReason,
    ) -> Result<Instance, OpError> {
        let slot = self.slot(id)?;
        // on_destroy `exec:` hooks run while the sandbox still runs; a failing hook is logged
        // and does not keep the sandbox alive.
        let (policy, running) = {
            let r = slot.rec.lock().await;
            (
                r.instance.policy.clone(),
                r.instance.state == SandboxState::Running,
            )
        };
        if running {
            if let Some(seq) = self
                .policies
                .load()
                .get(&policy)
                .map(|p| p.hooks.on_destroy.sequence.clone())
            {
                if let Err(e) = self.run_hooks(&slot, &seq).await {
                    tracing::warn!(instance_id = %id, error = %e, "on_destroy hook failed");
                }
            }
        }
        let rec = self.destroy_slot(&slot, reason, None).await?;
        Ok(rec.instance)
    }

    pub async fn pause(&self, id: &str) -> Result<Instance, OpError> {
        let slot = self.slot(id)?;
        let mut rec = slot.rec.lock().await;
        let caps = self.backend(rec.instance.backend)?.capabilities();
        if !caps.pause {
            return Err(OpError::unsupported(
                id,
                format!("pause is not supported by backend {}", rec.instance.backend),
            ));
        }
        rec.instance
            .state
            .transition(SandboxState::Paused)
            .map_err(|e| OpError::conflict(id, format!("instance `{id}`: {e}")))?;
        let rt = rec
            .runtime
            .clone()
            .ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
        self.backend(rt.backend)?
            .pause(&rt)
            .await
            .map_err(|e| OpError::backend(id, "pause", e))?;
        Self::transition(&mut rec, SandboxState::Paused)?;
        self.persist(&rec)?;
        info!(instance_id = %id, "instance paused");
        Ok(rec.instance.clone())
    }

    /// Thaws a paused instance, or restores a hibernated (checkpointed and stopped) one.
    pub async fn resume(self: &Arc<Self>, id: &str) -> Result<Instance, OpError> {
        let slot = self.slot(id)?;
        let mut rec = slot.rec.lock().await;
        match rec.instance.state {
            SandboxState::Paused => {
                let rt = rec.runtime.clone().ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
                self.backend(rt.backend)?.resume(&rt).await.map_err(|e| OpError::backend(id, "resume", e))?;
            }
            SandboxState::Checkpointed if rec.runtime.is_none() => {
                // Hibernated: start again from its last checkpoint.
                let ck = rec.instance.from_checkpoint.clone().and_then(|c| self.checkpoint_record(&c)).ok_or_else(|| OpError::conflict(id, "hibernated instance has lost its checkpoint"))?;
                let _g = RestoreGuard::new(self, &ck.checkpoint.checkpoint_id);
                let backend = self.backend(rec.instance.backend)?;
                let mut spec = rec.spec.clone();
                spec.from_checkpoint = Some(ck.dir.clone());
                let t0 = Instant::now();
                let rt = backend.create(&spec).await.map_err(|e| OpError::backend(id, "resume from hibernation", e))?;
                self.metrics.restore_duration.get_or_create(&BackendLabels { backend: rec.instance.backend.to_string() }).observe(t0.elapsed().as_secs_f64());
                rec.runtime = Some(rt.clone());
                self.supervise(&slot, rt);
            }
            SandboxState::Checkpointed => {
                let rt = rec.runtime.clone().ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
                self.backend(rt.backend)?.resume(&rt).await.map_err(|e| OpError::backend(id, "resume", e))?;
            }
            other => return Err(OpError::conflict(id, format!("instance `{id}` is {other}; only paused or checkpointed instances can be resumed"))),
        }
        Self::transition(&mut rec, SandboxState::Running)?;
        self.persist(&rec)?;
        info!(instance_id = %id, "instance resumed");
        Ok(rec.instance.clone())
    }

    /// Resets with the instance's effective reset mode; optionally returns it to its pool.
    ///
    /// A reset in place whose class has a warm pool takes over a warm instance's fresh
    /// sandbox (started from the same template by the same policy, i.e. exactly what the
    /// reset would produce) and retires the used one in the background: the caller waits for
    /// a store commit instead of a kill + respawn. Without a warm twin it resets in place.
    pub async fn reset(
        self: &Arc<Self>,
        id: &str,
        return_to_pool: bool,
    ) -> Result<ResetResponse, OpError> {
        let slot = self.slot(id)?;
        let mut rec = slot.rec.lock().await;
        if rec.instance.state != SandboxState::Running {
            return Err(OpError::conflict(
                id,
                format!(
                    "instance `{id}` is {}; only running instances can be reset",
                    rec.instance.state
                ),
            ));
        }
        let mode = rec.instance.reset_mode;
        let backend = self.backend(rec.instance.backend)?;
        if !backend.capabilities().supports_reset(mode) {
            return Err(OpError::unsupported(
                id,
                format!(
                    "reset mode {mode} is not supported by backend {}",
                    rec.instance.backend
                ),
            ));
        }
        let rt = rec
            .runtime
            .clone()
            .ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
        let t0 = Instant::now();
        let to_pool = return_to_pool
            && rec
                .instance
                .pool
                .as_ref()
                .is_some_and(|k| self.pools.has_room(k));
        // Returning to the pool through a swap would only move a warm sandbox around.
        let twin_slot = if to_pool {
            None
        } else {
            self.take_warm_twin(&rec).await
        };
        let twin = match &twin_slot {
            Some(ws) => {
                let w = ws.rec.lock().await;
                // Re-checked under the lock: it may have died since it was looked at.
                (w.instance.state == SandboxState::Warm && w.runtime.is_some()).then_some((ws, w))
            }
            None => None,
        };
        let from_pool = twin.is_some();
        // What both records were, to undo a swap the store refused.
        let before = twin.as_ref().map(|(_, w)| (rec.clone(), (**w).clone()));
        let mut retired = match twin {
            Some((wslot, mut w)) => {
                // The used sandbox goes to the twin's record, which is destroyed next; the
                // twin's fresh sandbox (and its directory and cgroup) become this instance's.
                slot.stop_supervisor();
                wslot.stop_supervisor();
                let fresh_rt = w.runtime.take();
                let fresh_spec = w.spec.clone();
                w.runtime = rec.runtime.take();
                w.spec = std::mem::replace(&mut rec.spec, fresh_spec);
                // Not a lifecycle transition of a client's instance: the record is only the
                // carrier of a sandbox being torn down, and `reset` is what recovery
                // destroys if the daemon dies before that is done.
                w.instance.state = SandboxState::Reset;
                w.instance.updated_at = rfc3339(now_ms());
                rec.runtime = fresh_rt;
                Some((wslot, w))
            }
            None => {
                Self::transition(&mut rec, SandboxState::Reset)?;
                self.persist(&rec)?;
                slot.stop_supervisor();
                let mut spec = rec.spec.clone();
                spec.from_checkpoint = None;
                match backend.reset(&rt, &spec, mode).await {
                    Ok(r) => {
                        rec.runtime = Some(r);
                        rec.spec = spec;
                    }
                    Err(e) => {
                        // The sandbox is in an unknown state: it must not serve again.
                        drop(rec);
                        let err = OpError::backend(id, "reset", e);
                        let _ = self
                            .destroy_slot(&slot, TerminationReason::Exited, None)
                            .await;
                        return Err(err);
                    }
                }
                None
            }
        };
        let new_rt = rec
            .runtime
            .clone()
            .ok_or_else(|| OpError::internal("reset left no runtime"))?;
        rec.instance.reset_count += 1;
        rec.instance.from_checkpoint = None;
        rec.head_checkpoint = None;
        if to_pool {
            Self::transition(&mut rec, SandboxState::Warm)?;
            rec.warm_since_ms = Some(now_ms());
            rec.expires_at_ms = None;
            rec.instance.expires_at = None;
            rec.instance.ttl_secs = None;
            rec.instance.labels.clear();
            rec.env.clear();
            rec.request_fingerprint = None;
        } else if rec.instance.state == SandboxState::Reset {
            Self::transition(&mut rec, SandboxState::Running)?;
        } else {
            rec.instance.updated_at = rfc3339(now_ms());
        }
        match (&mut retired, before) {
            (Some((wslot, w)), Some((rec_before, w_before))) => {
                if let Err(e) = self.store.put_instances(&[&*rec, &**w]) {
                    // Nothing was stored: put both back as they were and running again.
                    *rec = rec_before;
                    **w = w_before;
                    if let Some(rt) = rec.runtime.clone() {
                        self.supervise(&slot, rt);
                    }
                    if let Some(rt) = w.runtime.clone() {
                        self.supervise(wslot, rt);
                    }
                    if let Some(key) = w.instance.pool.clone() {
                        self.pools.add_warm(
                            &key,
                            &w.instance.id,
                            w.warm_since_ms.unwrap_or_else(now_ms),
                        );
                    }
                    return Err(OpError::internal(e));
                }
            }
            _ => self.persist(&rec)?,
        }
        self.supervise(&slot, new_rt);
        if let Some((wslot, w)) = retired {
            let (wid, me, wslot) = (w.instance.id.clone(), self.clone(), wslot.clone());
            drop(w);
            info!(instance_id = %id, warm_id = %wid, "reset took over a warm sandbox; retiring the used one");
            tokio::spawn(async move {
                if let Err(e) = me
                    .destroy_slot(&wslot, TerminationReason::Recycled, None)
                    .await
                {
                    warn!(instance_id = %wid, error = %e, "retiring a used sandbox after a reset failed");
                }
            });
            self.wake_pools.notify_one();
        }
        let elapsed = t0.elapsed();
        let labels = ModeLabels {
            backend: rec.instance.backend.to_string(),
            mode: mode.as_str().to_string(),
        };
        self.metrics
            .instances_resets_total
            .get_or_create(&labels)
            .inc();
        self.metrics
            .reset_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if to_pool {
            if let Some(key) = rec.instance.pool.clone() {
                self.pools.add_warm(&key, id, now_ms());
            }
        }
        let policy = self.policies.load().get(&rec.instance.policy).cloned();
        let instance = rec.instance.clone();
        drop(rec);
        if !to_pool {
            if let Some(p) = policy {
                self.run_hooks(&slot, &p.hooks.on_reset.sequence).await?;
            }
        }
        info!(instance_id = %id, mode = %mode, ms = elapsed.as_millis() as u64, to_pool, from_pool, "instance reset");
        Ok(ResetResponse {
            instance,
            mode,
            duration_ms: elapsed.as_millis() as u64,
            returned_to_pool: to_pool,
            from_pool,
        })
    }

    /// Takes a warm instance that is interchangeable with `rec` (same pool key, policy and
    /// template; `rec` not a fork) out of its pool. A candidate that does not fit goes back.
    async fn take_warm_twin(&self, rec: &InstanceRecord) -> Option<Arc<Slot>> {
        let i = &rec.instance;
        if i.from_checkpoint.is_some() || rec.spec.from_checkpoint.is_some() {
            return None;
        }
        let key = PoolKey {
            backend: i.backend,
            workload_class: i.workload_class.clone(),
            image_digest: i.image_digest.clone(),
        };
        let wid = self.pools.take_for_reset(&key)?;
        let wslot = self.slot(&wid).ok()?;
        let w = wslot.rec.lock().await;
        let fits = w.instance.policy == i.policy
            && w.instance.template == i.template
            && w.instance.backend == i.backend;
        if fits {
            drop(w);
            return Some(wslot);
        }
        if w.instance.state == SandboxState::Warm {
            self.pools
                .add_warm(&key, &wid, w.warm_since_ms.unwrap_or_else(now_ms));
        }
        None
    }

    /// Checkpoints a running or paused instance. With `stop`, hibernates it: the runtime is
    /// released and the instance waits in `checkpointed` until resumed.
    pub async fn checkpoint(
        self: &Arc<Self>,
        id: &str,
        stop: bool,
    ) -> Result<CheckpointResponse, OpError> {
        let slot = self.slot(id)?;
        let mut rec = slot.rec.lock().await;
        let state = rec.instance.state;
        if !matches!(state, SandboxState::Running | SandboxState::Paused) {
            return Err(OpError::conflict(id, format!("instance `{id}` is {state}; only running or paused instances can be checkpointed")));
        }
        let backend = self.backend(rec.instance.backend)?;
        let caps = backend.capabilities();
        if !caps.checkpoint_filesystem && !caps.checkpoint_memory {
            return Err(OpError::unsupported(
                id,
                format!(
                    "checkpoints are not supported by backend {}",
                    rec.instance.backend
                ),
            ));
        }
        let rt = rec
            .runtime
            .clone()
            .ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
        let ck_id = format!("ck-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let dir = self.checkpoint_dir(&ck_id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| OpError::internal(format!("creating {}: {e}", dir.display())))?;
        let t0 = Instant::now();
        let out = match backend.checkpoint(&rt, &dir).await {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(OpError::backend(id, "checkpoint", e));
            }
        };
        self.metrics
            .checkpoint_duration
            .get_or_create(&BackendLabels {
                backend: rec.instance.backend.to_string(),
            })
            .observe(t0.elapsed().as_secs_f64());
        let parent = rec.head_checkpoint.clone();
        let record = CheckpointRecord {
            checkpoint: Checkpoint {
                checkpoint_id: ck_id.clone(),
                instance_id: id.to_string(),
                parent,
                kind: out.kind,
                size_bytes: out.size_bytes,
                created_at: rfc3339(now_ms()),
                backend: rec.instance.backend,
                template: rec.instance.template.clone(),
                workload_class: rec.instance.workload_class.clone(),
            },
            dir,
        };
        if let Err(e) = self.store.put_checkpoint(&record) {
            let _ = std::fs::remove_dir_all(&record.dir);
            return Err(OpError::internal(e));
        }
        self.checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ck_id.clone(), record);
        rec.head_checkpoint = Some(ck_id.clone());
        if !stop {
            self.persist(&rec)?;
        }
        if stop {
            slot.stop_supervisor();
            backend
                .destroy(&rt)
                .await
                .map_err(|e| OpError::backend(id, "hibernate", e))?;
            rec.runtime = None;
            if state == SandboxState::Running {
                Self::transition(&mut rec, SandboxState::Paused)?;
            }
            Self::transition(&mut rec, SandboxState::Checkpointed)?;
            rec.instance.from_checkpoint = Some(ck_id.clone());
            self.persist(&rec)?;
            self.wake_pools.notify_one();
        }
        info!(instance_id = %id, checkpoint_id = %ck_id, bytes = out.size_bytes, stop, "checkpoint taken");
        Ok(CheckpointResponse {
            checkpoint_id: ck_id,
            instance_id: id.to_string(),
            kind: out.kind,
            size_bytes: out.size_bytes,
        })
    }

    pub fn checkpoints_of(&self, id: &str) -> Vec<Checkpoint> {
        let cks = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = cks
            .values()
            .filter(|c| c.checkpoint.instance_id == id)
            .map(|c| c.checkpoint.clone())
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        v
    }

    pub async fn delete_checkpoint(&self, ck_id: &str) -> Result<(), OpError> {
        if self
            .restoring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(ck_id)
        {
            return Err(OpError::Conflict {
                code: "checkpoint_in_use",
                message: format!("checkpoint `{ck_id}` is being restored from"),
                instance_id: None,
            });
        }
        let rec = self
            .checkpoint_record(ck_id)
            .ok_or_else(|| OpError::not_found(format!("checkpoint `{ck_id}` not found")))?;
        // A hibernated instance needs its checkpoint to come back.
        for s in self.all_slots() {
            // Wait for busy records: a locked one may be a hibernated instance.
            let r = s.rec.lock().await;
            if r.instance.state == SandboxState::Checkpointed
                && r.runtime.is_none()
                && r.instance.from_checkpoint.as_deref() == Some(ck_id)
            {
                return Err(OpError::Conflict {
                    code: "checkpoint_in_use",
                    message: format!(
                        "checkpoint `{ck_id}` holds hibernated instance `{}`",
                        r.instance.id
                    ),
                    instance_id: Some(r.instance.id.clone()),
                });
            }
        }
        self.store
            .delete_checkpoint(ck_id)
            .map_err(OpError::internal)?;
        self.checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ck_id);
        if rec.dir.exists() {
            std::fs::remove_dir_all(&rec.dir)
                .map_err(|e| OpError::internal(format!("removing {}: {e}", rec.dir.display())))?;
        }
        Ok(())
    }

    /// Restores the instance in place to one of its checkpoints.
    pub async fn rollback(self: &Arc<Self>, id: &str, ck_id: &str) -> Result<Instance, OpError> {
        let ck = self
            .checkpoint_record(ck_id)
            .ok_or_else(|| OpError::not_found(format!("checkpoint `{ck_id}` not found")))?;
        let slot = self.slot(id)?;
        let mut rec = slot.rec.lock().await;
        if ck.checkpoint.instance_id != id && ck.checkpoint.template != rec.instance.template {
            return Err(OpError::Unprocessable {
                code: "checkpoint_mismatch",
                message: format!("checkpoint `{ck_id}` belongs to another template"),
                instance_id: Some(id.into()),
            });
        }
        if ck.checkpoint.backend != rec.instance.backend {
            return Err(OpError::Unprocessable {
                code: "checkpoint_mismatch",
                message: format!("checkpoint `{ck_id}` was made by {}", ck.checkpoint.backend),
                instance_id: Some(id.into()),
            });
        }
        if !matches!(
            rec.instance.state,
            SandboxState::Running | SandboxState::Paused
        ) {
            return Err(OpError::conflict(
                id,
                format!(
                    "instance `{id}` is {}; only running or paused instances can roll back",
                    rec.instance.state
                ),
            ));
        }
        let backend = self.backend(rec.instance.backend)?;
        if !backend.capabilities().rollback {
            return Err(OpError::unsupported(
                id,
                format!(
                    "rollback is not supported by backend {}",
                    rec.instance.backend
                ),
            ));
        }
        let rt = rec
            .runtime
            .clone()
            .ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
        let _g = RestoreGuard::new(self, ck_id);
        slot.stop_supervisor();
        let t0 = Instant::now();
        let new_rt = match backend.rollback(&rt, &rec.spec, &ck.dir).await {
            Ok(r) => r,
            Err(e) => {
                drop(rec);
                let err = OpError::backend(id, "rollback", e);
                let _ = self
                    .destroy_slot(&slot, TerminationReason::Exited, None)
                    .await;
                return Err(err);
            }
        };
        self.metrics
            .restore_duration
            .get_or_create(&BackendLabels {
                backend: rec.instance.backend.to_string(),
            })
            .observe(t0.elapsed().as_secs_f64());
        rec.runtime = Some(new_rt.clone());
        rec.instance.from_checkpoint = Some(ck_id.to_string());
        rec.head_checkpoint = Some(ck_id.to_string());
        if rec.instance.state == SandboxState::Paused {
            Self::transition(&mut rec, SandboxState::Running)?;
        }
        rec.instance.updated_at = rfc3339(now_ms());
        self.persist(&rec)?;
        self.supervise(&slot, new_rt);
        info!(instance_id = %id, checkpoint_id = %ck_id, "instance rolled back");
        Ok(rec.instance.clone())
    }

    pub async fn set_ttl(&self, id: &str, ttl_secs: u64) -> Result<Instance, OpError> {
        if ttl_secs == 0 {
            return Err(OpError::BadRequest("`ttl_secs` must be at least 1".into()));
        }
        let slot = self.slot(id)?;
        let mut rec = slot.rec.lock().await;
        if matches!(
            rec.instance.state,
            SandboxState::Destroyed | SandboxState::Warm
        ) {
            return Err(OpError::conflict(
                id,
                format!("instance `{id}` is {}", rec.instance.state),
            ));
        }
        let max = self
            .policies
            .load()
            .get(&rec.instance.policy)
            .and_then(|p| p.limits.max_ttl)
            .or(self.cfg.limits.max_ttl);
        if let Some(m) = max {
            if ttl_secs > m.get().as_secs() {
                return Err(OpError::Unprocessable {
                    code: "ttl_too_long",
                    message: format!(
                        "ttl_secs {ttl_secs} exceeds the maximum of {}",
                        m.get().as_secs()
                    ),
                    instance_id: Some(id.into()),
                });
            }
        }
        rec.instance.ttl_secs = Some(ttl_secs);
        rec.expires_at_ms = Some(now_ms() + ttl_secs * 1000);
        rec.instance.expires_at = rec.expires_at_ms.map(rfc3339);
        rec.instance.updated_at = rfc3339(now_ms());
        self.persist(&rec)?;
        Ok(rec.instance.clone())
    }

    /// Checks an instance can run commands and returns how to reach its agent.
    pub async fn exec_target(&self, id: &str) -> Result<ExecTarget, OpError> {
        let slot = self.slot(id)?;
        self.exec_target_of(&slot).await
    }

    async fn exec_target_of(&self, slot: &Arc<Slot>) -> Result<ExecTarget, OpError> {
        let rec = slot.rec.lock().await;
        let id = rec.instance.id.clone();
        let backend = self.backend(rec.instance.backend)?;
        if !backend.capabilities().exec {
            return Err(OpError::unsupported(
                &id,
                format!("exec is not supported by backend {}", rec.instance.backend),
            ));
        }
        if rec.instance.state != SandboxState::Running {
            return Err(OpError::conflict(
                &id,
                format!(
                    "instance `{id}` is {}; exec needs a running instance",
                    rec.instance.state
                ),
            ));
        }
        let rt = rec
            .runtime
            .as_ref()
            .ok_or_else(|| OpError::conflict(&id, "instance has no runtime"))?;
        let ep = backend.agent_endpoint(rt).ok_or_else(|| {
            OpError::unsupported(
                &id,
                format!("backend {} runs no agent", rec.instance.backend),
            )
        })?;
        Ok(ExecTarget {
            client: AgentClient::new(ep),
            backend: rec.instance.backend,
            id,
            env: rec.env.clone(),
        })
    }

    pub async fn exec_start(
        &self,
        target: &ExecTarget,
        req: ExecRequest,
    ) -> Result<ExecStream, OpError> {
        validate_exec(&req)?;
        let mut env = target.env.clone();
        env.extend(req.env);
        let stdin = req.stdin.map(|s| bytes::Bytes::from(s.into_bytes()));
        let proto = anvil_backends::agent::ExecRequest {
            argv: req.cmd,
            env,
            cwd: req.cwd,
            timeout_ms: req.timeout_ms,
            stdin: stdin.is_some(),
        };
        target.client.exec(proto, stdin).await.map_err(|e| {
            OpError::backend(&target.id, "exec", anvil_backends::BackendError::Agent(e))
        })
    }

    pub fn observe_exec(&self, backend: BackendKind, d: Duration) {
        self.metrics
            .exec_duration
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .observe(d.as_secs_f64());
    }

    pub(crate) async fn exec_collect(
        &self,
        slot: &Arc<Slot>,
        req: ExecRequest,
    ) -> Result<ExecResponse, OpError> {
        let target = self.exec_target_of(slot).await?;
        self.exec_run(&target, req).await
    }

    /// Runs a command to completion and returns its output.
    pub async fn exec_run(
        &self,
        target: &ExecTarget,
        req: ExecRequest,
    ) -> Result<ExecResponse, OpError> {
        let t0 = Instant::now();
        let mut stream = self.exec_start(target, req).await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let agent_err =
            |e| OpError::backend(&target.id, "exec", anvil_backends::BackendError::Agent(e));
        while let Some(ev) = stream.next().await {
            match ev.map_err(agent_err)? {
                ExecEvent::Stdout(b) => append_capped(&mut out, &b),
                ExecEvent::Stderr(b) => append_capped(&mut err, &b),
                ExecEvent::Exit(x) => {
                    self.observe_exec(target.backend, t0.elapsed());
                    return Ok(ExecResponse {
                        exit_code: x.exit_code,
                        signal: x.signal,
                        stdout: String::from_utf8_lossy(&out).into_owned(),
                        stderr: String::from_utf8_lossy(&err).into_owned(),
                        duration_ms: x.duration_ms,
                        timed_out: x.timed_out,
                    });
                }
            }
        }
        Err(OpError::Backend {
            message: format!(
                "exec in instance `{}`: the agent closed the stream without an exit status",
                target.id
            ),
            instance_id: Some(target.id.clone()),
            source: anvil_backends::BackendError::Other("agent stream ended early".into()),
        })
    }

    /// Reads a file inside the sandbox.
    pub async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, OpError> {
        validate_path(path)?;
        let (backend, rt, ep) = self.files_target(id).await?;
        match ep {
            Some(ep) => AgentClient::new(ep)
                .with_max_file_bytes(self.cfg.limits.max_file_body.bytes())
                .read_file(path)
                .await
                .map_err(|e| {
                    OpError::backend(id, "file read", anvil_backends::BackendError::Agent(e))
                }),
            None => backend
                .read_file(&rt, path)
                .await
                .map_err(|e| file_error(id, "file read", e)),
        }
    }

    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: &[u8],
        mode: u32,
    ) -> Result<u64, OpError> {
        validate_path(path)?;
        if mode > 0o7777 {
            return Err(OpError::BadRequest(format!(
                "mode {mode:o} is not a file mode"
            )));
        }
        let (backend, rt, ep) = self.files_target(id).await?;
        match ep {
            Some(ep) => AgentClient::new(ep)
                .write_file(path, data, mode)
                .await
                .map_err(|e| {
                    OpError::backend(id, "file write", anvil_backends::BackendError::Agent(e))
                }),
            None => backend
                .write_file(&rt, path, data, mode)
                .await
                .map(|_| data.len() as u64)
                .map_err(|e| file_error(id, "file write", e)),
        }
    }

    async fn files_target(
        &self,
        id: &str,
    ) -> Result<
        (
            Arc<dyn anvil_backends::Backend>,
            anvil_backends::Runtime,
            Option<anvil_backends::agent::AgentEndpoint>,
        ),
        OpError,
    > {
        let slot = self.slot(id)?;
        let rec = slot.rec.lock().await;
        let backend = self.backend(rec.instance.backend)?;
        if !backend.capabilities().files {
            return Err(OpError::unsupported(
                id,
                format!(
                    "files are not supported by backend {}",
                    rec.instance.backend
                ),
            ));
        }
        if rec.instance.state != SandboxState::Running {
            return Err(OpError::conflict(
                id,
                format!(
                    "instance `{id}` is {}; files need a running instance",
                    rec.instance.state
                ),
            ));
        }
        let rt = rec
            .runtime
            .clone()
            .ok_or_else(|| OpError::conflict(id, "instance has no runtime"))?;
        let ep = backend.agent_endpoint(&rt);
        Ok((backend, rt, ep))
    }

    /// Destroys every live instance (SIGTERM with `[daemon].shutdown = destroy`).
    pub async fn destroy_all(self: &Arc<Self>, reason: TerminationReason) {
        for s in self.all_slots() {
            let _ = self.destroy_slot(&s, reason, None).await;
        }
    }
}

fn append_capped(buf: &mut Vec<u8>, b: &[u8]) {
    let room = MAX_COLLECTED_OUTPUT.saturating_sub(buf.len());
    buf.extend_from_slice(&b[..b.len().min(room)]);
}

fn file_error(id: &str, op: &str, e: anvil_backends::BackendError) -> OpError {
    match &e {
        anvil_backends::BackendError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            OpError::NotFound {
                message: format!("{op}: {e}"),
                instance_id: Some(id.into()),
            }
        }
        anvil_backends::BackendError::Other(m) => OpError::BadRequest(m.clone()),
        _ => OpError::backend(id, op, e),
    }
}

fn validate_exec(req: &ExecRequest) -> Result<(), OpError> {
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(OpError::BadRequest("`cmd` must name a program".into()));
    }
    if req.cmd.iter().any(|a| a.contains('\0')) {
        return Err(OpError::BadRequest(
            "`cmd` arguments may not contain NUL bytes".into(),
        ));
    }
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') {
            return Err(OpError::BadRequest(format!(
                "`cwd` `{cwd}` must be absolute"
            )));
        }
    }
    if req.timeout_ms == Some(0) {
        return Err(OpError::BadRequest(
            "`timeout_ms` must be at least 1".into(),
        ));
    }
    Ok(())
}

pub fn validate_path(path: &str) -> Result<(), OpError> {
    if !path.starts_with('/') {
        return Err(OpError::BadRequest(format!(
            "`path` `{path}` must be absolute"
        )));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(OpError::BadRequest(
            "`path` contains NUL or is too long".into(),
        ));
    }
    Ok(())
}
