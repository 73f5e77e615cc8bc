//! Creating instances: policy evaluation, backend selection, warm claims, cold spawns, forks.

use super::{Manager, OpError, RestoreGuard, Slot};
use crate::metrics::{BackendLabels, BackendPathLabels, PoolLabels};
use crate::model::{
    now_ms, rfc3339, CheckpointRecord, CreateRequest, CreateResponse, Instance, InstanceRecord,
};
use anvil_backends::registry::Registry;
use anvil_backends::{InstanceSpec, Quota, TemplateFiles, VmSpec};
use anvil_core::backend::{BackendKind, ResetMode};
use anvil_core::hooks::HookRegistry;
use anvil_core::lifecycle::{SandboxState, StartPath, TerminationReason};
use anvil_core::policy::{HookStep, Policy};
use anvil_core::pool::PoolKey;
use anvil_core::selector::{select, Availability, Decision};
use anvil_core::template::{TemplateRecord, TemplateStatus};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// Digest used for instances without a template (mock backend only).
pub const NO_TEMPLATE_DIGEST: &str = "none";

/// Why a new instance could not be reserved.
enum Reserve {
    /// The id is taken (an idempotent retry, or a conflict).
    Exists(Arc<Slot>),
    /// `[daemon].max_instances` live instances already.
    AtCapacity,
}

/// Everything a create needs after policy evaluation and selection.
pub(crate) struct Resolved {
    pub policy: Policy,
    pub decision: Decision,
    pub backend: BackendKind,
    pub template: Option<TemplateRecord>,
    pub image_digest: String,
    pub reset_mode: ResetMode,
}

/// Marks each built-in hook available when a backend that owns it probed available.
pub(crate) fn fill_hook_availability(hooks: &mut HookRegistry, registry: &Registry) {
    for view in hooks.list() {
        let available_owner = view
            .owners
            .iter()
            .find(|k| registry.availability(**k).is_ok());
        let _ = match available_owner {
            Some(k) => hooks.set_available(&view.name, true, Some(format!("provided by {k}"))),
            None => {
                let owners: Vec<_> = view.owners.iter().map(|k| k.as_str()).collect();
                hooks.set_available(
                    &view.name,
                    false,
                    Some(format!(
                        "no available backend provides it (owners: {})",
                        owners.join(", ")
                    )),
                )
            }
        };
    }
}

fn fingerprint(req: &CreateRequest) -> String {
    // BTreeMaps serialize sorted, so equal bodies give equal bytes.
    let bytes = serde_json::to_vec(req).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))
}

fn new_instance_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("sb-{}", &u[..16])
}

impl Manager {
    fn validate_create(&self, req: &CreateRequest) -> Result<(), OpError> {
        if req.workload_class.trim().is_empty() {
            return Err(OpError::BadRequest(
                "`workload_class` must not be empty".into(),
            ));
        }
        if let Some(id) = &req.id {
            anvil_core::ids::validate_instance_id(id)
                .map_err(|e| OpError::BadRequest(format!("`id`: {e}")))?;
        }
        if let Some(ck) = &req.from_checkpoint {
            anvil_core::ids::validate_instance_id(ck)
                .map_err(|e| OpError::BadRequest(format!("`from_checkpoint`: {e}")))?;
        }
        if req.ttl_secs == Some(0) {
            return Err(OpError::BadRequest("`ttl_secs` must be at least 1".into()));
        }
        for k in req.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(OpError::BadRequest(format!(
                    "`env` key `{k}` is not a valid variable name"
                )));
            }
        }
        for (k, v) in &req.labels {
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(OpError::BadRequest(format!(
                    "label `{k}` is empty or too long"
                )));
            }
        }
        Ok(())
    }

    /// The TTL of a new instance: the request's (bounded by max_ttl), else the policy's or the
    /// daemon's default.
    fn resolve_ttl(
        &self,
        policy: &Policy,
        requested: Option<u64>,
        id: &str,
    ) -> Result<Option<u64>, OpError> {
        let max = policy
            .limits
            .max_ttl
            .or(self.cfg.limits.max_ttl)
            .map(|d| d.get().as_secs());
        let ttl = requested.or_else(|| {
            policy
                .limits
                .default_ttl
                .or(self.cfg.limits.default_ttl)
                .map(|d| d.get().as_secs())
        });
        if let (Some(t), Some(m)) = (ttl, max) {
            if t > m {
                return Err(OpError::Unprocessable {
                    code: "ttl_too_long",
                    message: format!(
                        "ttl_secs {t} exceeds the maximum of {m} seconds set by policy `{}`",
                        policy.policy_name
                    ),
                    instance_id: Some(id.to_string()),
                });
            }
        }
        Ok(ttl)
    }

    pub(crate) fn find_template(&self, name_or_id: &str) -> Option<TemplateRecord> {
        self.templates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name_or_id)
            .cloned()
    }

    /// Why `kind` cannot serve `template`, if it cannot.
    fn template_fit(kind: BackendKind, template: Option<&TemplateRecord>) -> Result<(), String> {
        let Some(t) = template else {
            return match kind {
                BackendKind::Mock => Ok(()),
                _ => Err(format!("backend {kind} needs a template, and neither the request, the policy nor [template].default names one")),
            };
        };
        match &t.status {
            TemplateStatus::Ready => {}
            // A failed VM snapshot only rules out VM backends; the rootfs still serves others.
            TemplateStatus::Failed { .. }
                if kind != BackendKind::Firecracker && t.rootfs_dir.is_some() => {}
            TemplateStatus::Failed { reason } => {
                return Err(format!("template `{}` failed: {reason}", t.name))
            }
            TemplateStatus::Building => {
                return Err(format!("template `{}` is still building", t.name))
            }
        }
        match kind {
            BackendKind::Bubblewrap if t.rootfs_dir.is_none() => Err(format!(
                "template `{}` has no rootfs directory for bubblewrap",
                t.name
            )),
            BackendKind::Firecracker if t.kernel.is_none() || t.rootfs_image.is_none() => {
                Err(format!(
                    "template `{}` has no kernel and rootfs image for firecracker",
                    t.name
                ))
            }
            _ => Ok(()),
        }
    }

    /// Evaluates the policy, resolves the template and selects a backend.
    pub(crate) fn resolve(
        &self,
        class: &str,
        labels: &BTreeMap<String, String>,
        template: Option<&str>,
        digest: Option<&str>,
        fork: Option<&CheckpointRecord>,
    ) -> Result<Resolved, OpError> {
        let policies = self.policies.load();
        let policy = match policies.evaluate(class, labels) {
            Ok(p) => p.clone(),
            Err(e) => {
                self.metrics.policy_eval_failures_total.inc();
                return Err(OpError::Unprocessable {
                    code: "no_matching_policy",
                    message: e.to_string(),
                    instance_id: None,
                });
            }
        };
        let template_name = fork
            .and_then(|c| c.checkpoint.template.clone())
            .or_else(|| template.map(str::to_string))
            .or_else(|| policy.select.templates.first().cloned())
            .or_else(|| self.cfg.template.default.clone());
        let template = match &template_name {
            Some(n) => Some(
                self.find_template(n)
                    .ok_or_else(|| OpError::Unprocessable {
                        code: "unknown_template",
                        message: format!(
                            "template `{n}` does not exist (import it with POST /v1/templates)"
                        ),
                        instance_id: None,
                    })?,
            ),
            None => None,
        };
        if let Some(t) = &template {
            if !policy.select.templates.is_empty()
                && !policy
                    .select
                    .templates
                    .iter()
                    .any(|n| n == &t.name || n == &t.id)
            {
                return Err(OpError::Unprocessable {
                    code: "template_not_allowed",
                    message: format!(
                        "policy `{}` does not allow template `{}` (allowed: {})",
                        policy.policy_name,
                        t.name,
                        policy.select.templates.join(", ")
                    ),
                    instance_id: None,
                });
            }
        }
        let image_digest = template
            .as_ref()
            .map(|t| t.image_digest.clone())
            .unwrap_or_else(|| NO_TEMPLATE_DIGEST.to_string());
        if let Some(d) = digest {
            if d != image_digest {
                return Err(OpError::Unprocessable {
                    code: "digest_mismatch",
                    message: format!(
                        "image_digest `{d}` does not match template digest `{image_digest}`"
                    ),
                    instance_id: None,
                });
            }
        }
        let fork_backend = fork.map(|c| c.checkpoint.backend);
        let mut decision = select(&policy, &|kind| {
            if let Some(b) = fork_backend {
                if b != kind {
                    return Availability::Unavailable(format!("checkpoint was made by {b}"));
                }
            }
            if let Err(r) = self.registry.availability(kind) {
                return Availability::Unavailable(r);
            }
            if let Some(r) = self.hooks.selection_blocker(&policy, kind) {
                return Availability::Unavailable(r);
            }
            match Self::template_fit(kind, template.as_ref()) {
                Ok(()) => Availability::Available,
                Err(r) => Availability::Unavailable(r),
            }
        });
        let Some(backend) = decision.backend else {
            let why: Vec<_> = decision
                .skipped
                .iter()
                .map(|s| format!("{}: {}", s.backend, s.reason))
                .collect();
            return Err(OpError::Unavailable {
                code: "no_backend_available",
                message: format!(
                    "no backend of policy `{}` is available ({})",
                    policy.policy_name,
                    why.join("; ")
                ),
                retry_after_secs: 5,
            });
        };
        let mut hook_check =
            self.hooks
                .check(&policy, backend)
                .map_err(|e| OpError::Unprocessable {
                    code: "missing_kernel_hook",
                    message: e.to_string(),
                    instance_id: None,
                })?;
        let supported = self
            .registry
            .get_any(backend)
            .map(|b| b.capabilities().reset_modes)
            .unwrap_or_default();
        // `fail`/`continue` keep the policy's mode; a reset then answers 422 naming why.
        let reset_mode = hook_check
            .effective_reset_mode(policy.pool.reset_mode, &supported)
            .unwrap_or(policy.pool.reset_mode);
        decision.notes.extend(hook_check.notes.iter().cloned());
        Ok(Resolved {
            policy,
            decision,
            backend,
            template,
            image_digest,
            reset_mode,
        })
    }

    pub(crate) fn build_spec(
        &self,
        id: &str,
        r: &Resolved,
        fork: Option<&CheckpointRecord>,
    ) -> InstanceSpec {
        let q = &r.policy.quota;
        let vm = (r.backend == BackendKind::Firecracker).then(|| VmSpec {
            vcpus: r.policy.vm.vcpus,
            memory_bytes: r.policy.vm.memory.bytes(),
            boot_args: r.policy.backend.firecracker.boot_args.clone(),
            enable_vsock: r.policy.backend.firecracker.enable_vsock,
            serial_log: r.policy.backend.firecracker.serial_log,
        });
        InstanceSpec {
            id: id.to_string(),
            instance_dir: self.instance_dir(id),
            cgroup_name: id.to_string(),
            template: r.template.as_ref().map(template_files).unwrap_or_default(),
            quota: Quota {
                cpu_shares: q.cpu_shares,
                memory_high: q.memory_high.map(|b| b.bytes()),
                memory_max: q.memory_max.map(|b| b.bytes()),
                pids_max: q.pids_max,
            },
            network: r.policy.select.network,
            env: BTreeMap::new(),
            vm,
            from_checkpoint: fork.map(|c| c.dir.clone()),
        }
    }

    fn new_record(
        &self,
        id: &str,
        r: &Resolved,
        spec: InstanceSpec,
        start_path: StartPath,
        class: &str,
    ) -> InstanceRecord {
        let now = rfc3339(now_ms());
        InstanceRecord {
            instance: Instance {
                id: id.to_string(),
                state: SandboxState::Pending,
                workload_class: class.to_string(),
                policy: r.policy.policy_name.clone(),
                backend: r.backend,
                start_path,
                template: r.template.as_ref().map(|t| t.id.clone()),
                image_digest: r.image_digest.clone(),
                labels: BTreeMap::new(),
                kernel_version: None,
                reset_mode: r.reset_mode,
                created_at: now.clone(),
                updated_at: now,
                expires_at: None,
                ttl_secs: None,
                termination_reason: None,
                destroyed_at: None,
                from_checkpoint: None,
                reset_count: 0,
                pool: None,
                last_error: None,
            },
            expires_at_ms: None,
            spec,
            runtime: None,
            env: BTreeMap::new(),
            request_fingerprint: None,
            warm_since_ms: None,
            decision: Some(r.decision.clone()),
            head_checkpoint: None,
        }
    }

    /// Inserts a slot for a new id, admitting it against `[daemon].max_instances` under the
    /// same lock (so concurrent creates cannot all pass the check before any of them is
    /// counted); if the id exists, hands back the existing slot instead.
    fn reserve(&self, id: &str, rec: InstanceRecord) -> Result<Arc<Slot>, Reserve> {
        let mut map = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = map.get(id) {
            return Err(Reserve::Exists(existing.clone()));
        }
        let live = map.values().filter(|s| s.is_live()).count() as u64;
        if live >= u64::from(self.cfg.daemon.max_instances) {
            return Err(Reserve::AtCapacity);
        }
        let slot = Slot::new(rec);
        map.insert(id.to_string(), slot.clone());
        Ok(slot)
    }

    fn at_capacity(&self) -> OpError {
        OpError::Unavailable {
            code: "at_capacity",
            message: format!(
                "host is at capacity ({} instances, [daemon].max_instances)",
                self.cfg.daemon.max_instances
            ),
            retry_after_secs: 1,
        }
    }

    /// Memory-based admission: refuses new sandboxes while MemAvailable is below
    /// `[limits].min_free_memory`.
    fn check_memory(&self) -> Result<(), OpError> {
        let Some(floor) = self.cfg.limits.min_free_memory else {
            return Ok(());
        };
        let (total, available) = crate::util::meminfo();
        // An unreadable /proc/meminfo gives no basis to refuse.
        if total > 0 && available < floor.bytes() {
            return Err(OpError::Unavailable {
                code: "insufficient_memory",
                message: format!(
                    "host MemAvailable is {} MiB, below [limits].min_free_memory ({floor})",
                    available >> 20
                ),
                retry_after_secs: 5,
            });
        }
        Ok(())
    }

    async fn idempotent_answer(
        &self,
        slot: &Arc<Slot>,
        fp: &str,
        id: &str,
    ) -> Result<(CreateResponse, bool), OpError> {
        let rec = slot.rec.lock().await;
        if rec.request_fingerprint.as_deref() == Some(fp)
            && rec.instance.state != SandboxState::Destroyed
        {
            let decision = rec.decision.clone().unwrap_or_else(|| Decision {
                policy: rec.instance.policy.clone(),
                backend: Some(rec.instance.backend),
                skipped: Vec::new(),
                notes: Vec::new(),
            });
            return Ok((
                CreateResponse {
                    start_path: rec.instance.start_path,
                    instance: rec.instance.clone(),
                    decision,
                },
                false,
            ));
        }
        Err(OpError::Conflict {
            code: "idempotency_conflict",
            message: format!("instance `{id}` already exists with a different request body"),
            instance_id: Some(id.to_string()),
        })
    }

    /// `POST /v1/instances`. Returns the response and whether a new instance was made
    /// (201) or an identical earlier request was answered again (200).
    pub async fn create(
        self: &Arc<Self>,
        req: CreateRequest,
    ) -> Result<(CreateResponse, bool), OpError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(OpError::Unavailable {
                code: "shutting_down",
                message: "the daemon is shutting down".into(),
                retry_after_secs: 5,
            });
        }
        self.validate_create(&req)?;
        let fp = fingerprint(&req);
        if let Some(id) = &req.id {
            if let Ok(slot) = self.slot(id) {
                return self.idempotent_answer(&slot, &fp, id).await;
            }
        }
        let fork = match &req.from_checkpoint {
            Some(ck) => Some(
                self.checkpoint_record(ck)
                    .ok_or_else(|| OpError::not_found(format!("checkpoint `{ck}` not found")))?,
            ),
            None => None,
        };
        let r = self.resolve(
            &req.workload_class,
            &req.labels,
            req.template.as_deref(),
            req.image_digest.as_deref(),
            fork.as_ref(),
        )?;
        let probe_id = req.id.clone().unwrap_or_default();
        let ttl = self.resolve_ttl(&r.policy, req.ttl_secs, &probe_id)?;

        if fork.is_none() {
            let key = PoolKey {
                backend: r.backend,
                workload_class: req.workload_class.clone(),
                image_digest: r.image_digest.clone(),
            };
            let labels = PoolLabels {
                backend: r.backend.to_string(),
                workload_class: req.workload_class.clone(),
            };
            while let Some(warm_id) = self.pools.claim(&key) {
                match self.claim_warm(&warm_id, &req, &fp, ttl, &r).await {
                    Ok(resp) => {
                        tracing::Span::current()
                            .record("instance_id", tracing::field::display(&resp.instance.id));
                        self.metrics.pool_hits_total.get_or_create(&labels).inc();
                        self.wake_pools.notify_one();
                        return Ok((resp, true));
                    }
                    Err(e) => {
                        warn!(instance_id = %warm_id, error = %e, "warm instance could not be claimed; trying another");
                        // Still warm (the claim was refused before any change): back to its pool.
                        if let Ok(slot) = self.slot(&warm_id) {
                            if slot.rec.lock().await.instance.state == SandboxState::Warm {
                                self.pools.add_warm(&key, &warm_id, now_ms());
                            }
                        }
                        if matches!(
                            e,
                            OpError::Conflict {
                                code: "idempotency_conflict",
                                ..
                            }
                        ) {
                            return Err(e);
                        }
                    }
                }
            }
            if self.pools.is_pooled(&key) {
                self.metrics.pool_misses_total.get_or_create(&labels).inc();
                self.wake_pools.notify_one();
            }
        }

        // Cheap early refusal; `reserve` is where admission is decided.
        if self.live_count().await >= u64::from(self.cfg.daemon.max_instances) {
            return Err(self.at_capacity());
        }
        self.check_memory()?;

        let id = req.id.clone().unwrap_or_else(new_instance_id);
        tracing::Span::current().record("instance_id", tracing::field::display(&id));
        // A fork, or a VM made from its template's boot snapshot, is a restore.
        let from_snapshot = r
            .template
            .as_ref()
            .is_some_and(|t| t.snapshot_dir.is_some())
            && r.backend == BackendKind::Firecracker;
        let start_path = if fork.is_some() || from_snapshot {
            StartPath::Restore
        } else {
            StartPath::Cold
        };
        let spec = self.build_spec(&id, &r, fork.as_ref());
        let mut rec = self.new_record(&id, &r, spec, start_path, &req.workload_class);
        rec.instance.labels = req.labels.clone();
        rec.instance.kernel_version = req.kernel_version.clone();
        rec.instance.from_checkpoint = req.from_checkpoint.clone();
        rec.head_checkpoint = req.from_checkpoint.clone();
        rec.env = req.env.clone();
        rec.request_fingerprint = Some(fp.clone());
        set_ttl(&mut rec, ttl);
        let slot = match self.reserve(&id, rec) {
            Ok(s) => s,
            Err(Reserve::Exists(existing)) => {
                return self.idempotent_answer(&existing, &fp, &id).await
            }
            Err(Reserve::AtCapacity) => return Err(self.at_capacity()),
        };
        // The spawn runs in its own task: if this request is dropped half-way (request
        // timeout, client gone), the guard lets it finish and then destroys the instance,
        // instead of leaving it `creating` forever with its processes and mounts.
        let me = self.clone();
        let task_slot = slot.clone();
        let hooks = r.policy.hooks.on_create.sequence.clone();
        let restore_from = fork.as_ref().map(|c| c.checkpoint.checkpoint_id.clone());
        let mut work = CreateWork {
            m: self.clone(),
            slot: slot.clone(),
            handle: Some(tokio::spawn(async move {
                let _restoring = restore_from.as_deref().map(|ck| RestoreGuard::new(&me, ck));
                me.spawn_into(&task_slot, SandboxState::Running).await?;
                if let Err(e) = me.run_hooks(&task_slot, &hooks).await {
                    let _ = me
                        .destroy_slot(&task_slot, TerminationReason::SpawnFailed, None)
                        .await;
                    return Err(e);
                }
                Ok(me.slot_instance(&task_slot).await)
            })),
        };
        let joined = match work.handle.as_mut() {
            Some(h) => h.await,
            None => return Err(OpError::internal("create task missing")),
        };
        work.handle = None;
        let instance =
            joined.map_err(|e| OpError::internal(format!("create task failed: {e}")))??;
        Ok((
            CreateResponse {
                start_path,
                instance,
                decision: r.decision,
            },
            true,
        ))
    }

    /// The instance as it stands after any hooks have run.
    pub(crate) async fn slot_instance(&self, slot: &Arc<Slot>) -> Instance {
        slot.rec.lock().await.instance.clone()
    }

    /// Spawns the sandbox of a pending record in `slot` and moves it to `target` (running or
    /// warm). On failure the record ends destroyed with `spawn-failed`; nothing is left behind.
    pub(crate) async fn spawn_into(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        target: SandboxState,
    ) -> Result<Instance, OpError> {
        // Queue for a create slot *before* locking the record: a queued create stays
        // `pending` and never blocks reads of the instance (GET, list) while it waits.
        let _permit = self
            .create_permits
            .acquire()
            .await
            .map_err(OpError::internal)?;
        let mut rec = slot.rec.lock().await;
        let id = rec.instance.id.clone();
        let backend = self.backend(rec.instance.backend)?;
        Self::transition(&mut rec, SandboxState::Creating)?;
        self.persist(&rec)?;
        let t0 = Instant::now();
        match backend.create(&rec.spec).await {
            Ok(rt) => {
                rec.runtime = Some(rt.clone());
                Self::transition(&mut rec, target)?;
                if target == SandboxState::Warm {
                    rec.warm_since_ms = Some(now_ms());
                }
                if let Err(e) = self.persist(&rec) {
                    // Not acknowledged: do not leave a sandbox the store does not know.
                    let _ = backend.destroy(&rt).await;
                    rec.runtime = None;
                    rec.instance.state = SandboxState::Destroyed;
                    slot.mark_dead();
                    return Err(e);
                }
                let elapsed = t0.elapsed().as_secs_f64();
                let path = rec.instance.start_path.as_str().to_string();
                let b = rec.instance.backend.to_string();
                self.metrics
                    .create_duration
                    .get_or_create(&BackendPathLabels {
                        backend: b.clone(),
                        start_path: path.clone(),
                    })
                    .observe(elapsed);
                if rec.instance.start_path == StartPath::Restore {
                    self.metrics
                        .restore_duration
                        .get_or_create(&BackendLabels { backend: b.clone() })
                        .observe(elapsed);
                }
                self.metrics
                    .instances_created_total
                    .get_or_create(&BackendPathLabels {
                        backend: b,
                        start_path: path,
                    })
                    .inc();
                info!(instance_id = %id, backend = %rec.instance.backend, state = %target, ms = t0.elapsed().as_millis() as u64, "instance created");
                self.supervise(slot, rt);
                Ok(rec.instance.clone())
            }
            Err(e) => {
                let msg = e.to_string();
                rec.instance.state = SandboxState::Destroyed;
                slot.mark_dead();
                rec.instance.termination_reason = Some(TerminationReason::SpawnFailed);
                rec.instance.destroyed_at = Some(rfc3339(now_ms()));
                rec.instance.last_error = Some(msg.clone());
                let _ = self.persist(&rec);
                self.metrics
                    .instances_destroyed_total
                    .get_or_create(&crate::metrics::ReasonLabels {
                        backend: rec.instance.backend.to_string(),
                        reason: "spawn-failed".into(),
                    })
                    .inc();
                warn!(instance_id = %id, error = %msg, "spawn failed");
                Err(OpError::Unavailable {
                    code: "spawn_failed",
                    message: format!("creating instance `{id}` failed: {msg}"),
                    retry_after_secs: 1,
                })
            }
        }
    }

    /// Hands a warm instance to a create request.
    async fn claim_warm(
        self: &Arc<Self>,
        warm_id: &str,
        req: &CreateRequest,
        fp: &str,
        ttl: Option<u64>,
        r: &Resolved,
    ) -> Result<CreateResponse, OpError> {
        let slot = self.slot(warm_id)?;
        let mut rec = slot.rec.lock().await;
        if rec.instance.state != SandboxState::Warm {
            return Err(OpError::conflict(warm_id, "no longer warm"));
        }
        let new_id = req.id.clone().filter(|n| n != warm_id);
        // Refuse before touching the record, so a refused claim leaves it warm.
        if let Some(n) = &new_id {
            if self
                .slots
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(n)
            {
                return Err(OpError::Conflict {
                    code: "idempotency_conflict",
                    message: format!("instance `{n}` already exists"),
                    instance_id: Some(n.clone()),
                });
            }
        }
        let before = rec.clone();
        Self::transition(&mut rec, SandboxState::Creating)?;
        Self::transition(&mut rec, SandboxState::Running)?;
        rec.instance.start_path = StartPath::Warm;
        rec.instance.labels = req.labels.clone();
        rec.instance.kernel_version = req.kernel_version.clone();
        rec.instance.workload_class = req.workload_class.clone();
        rec.instance.policy = r.policy.policy_name.clone();
        rec.instance.reset_mode = r.reset_mode;
        rec.env = req.env.clone();
        rec.request_fingerprint = Some(fp.to_string());
        rec.decision = Some(r.decision.clone());
        rec.warm_since_ms = None;
        set_ttl(&mut rec, ttl);
        match &new_id {
            Some(n) => {
                rec.instance.id = n.clone();
                {
                    let mut map = self.slots.write().unwrap_or_else(|e| e.into_inner());
                    if map.contains_key(n) {
                        *rec = before;
                        return Err(OpError::Conflict {
                            code: "idempotency_conflict",
                            message: format!("instance `{n}` already exists"),
                            instance_id: Some(n.clone()),
                        });
                    }
                    map.remove(warm_id);
                    map.insert(n.clone(), slot.clone());
                }
                self.store
                    .rename_instance(warm_id, &rec)
                    .map_err(OpError::internal)?;
            }
            None => self.persist(&rec)?,
        }
        let b = rec.instance.backend.to_string();
        self.metrics
            .instances_created_total
            .get_or_create(&BackendPathLabels {
                backend: b.clone(),
                start_path: "warm".into(),
            })
            .inc();
        self.metrics
            .create_duration
            .get_or_create(&BackendPathLabels {
                backend: b,
                start_path: "warm".into(),
            })
            .observe(0.0);
        info!(instance_id = %rec.instance.id, warm_id, "claimed warm instance");
        let instance = rec.instance.clone();
        Ok(CreateResponse {
            instance,
            decision: r.decision.clone(),
            start_path: StartPath::Warm,
        })
    }

    /// Starts one warm instance for `key` (pool refill).
    pub(crate) async fn create_warm(
        self: &Arc<Self>,
        key: &PoolKey,
        policy_name: &str,
    ) -> Result<String, OpError> {
        let policy = self
            .policies
            .load()
            .get(policy_name)
            .cloned()
            .ok_or_else(|| OpError::not_found(format!("policy `{policy_name}`")))?;
        let labels = BTreeMap::new();
        let r = self.resolve(
            &key.workload_class,
            &labels,
            None,
            Some(&key.image_digest),
            None,
        )?;
        if r.backend != key.backend || r.policy.policy_name != policy.policy_name {
            return Err(OpError::Unavailable {
                code: "pool_backend_changed",
                message: format!(
                    "class {} now resolves to {} / {}",
                    key.workload_class, r.backend, r.policy.policy_name
                ),
                retry_after_secs: 1,
            });
        }
        let id = new_instance_id();
        let spec = self.build_spec(&id, &r, None);
        let mut rec = self.new_record(&id, &r, spec, StartPath::Cold, &key.workload_class);
        rec.instance.pool = Some(key.clone());
        self.check_memory()?;
        let slot = self.reserve(&id, rec).map_err(|e| match e {
            Reserve::AtCapacity => self.at_capacity(),
            Reserve::Exists(_) => OpError::internal("instance id collision"),
        })?;
        self.spawn_into(&slot, SandboxState::Warm).await?;
        Ok(id)
    }

    /// Runs a hook sequence: `exec:<command>` entries run in the sandbox via its agent; named
    /// hooks were checked for availability at policy load and create.
    pub(crate) async fn run_hooks(
        &self,
        slot: &Arc<Slot>,
        sequence: &[HookStep],
    ) -> Result<(), OpError> {
        for entry in sequence {
            let HookStep::Exec(cmd) = entry else { continue };
            let id = slot.rec.lock().await.instance.id.clone();
            let req = crate::model::ExecRequest {
                cmd: vec!["/bin/sh".into(), "-c".into(), cmd.to_string()],
                timeout_ms: Some(30_000),
                ..Default::default()
            };
            let out = self.exec_collect(slot, req).await?;
            if out.exit_code != Some(0) {
                return Err(OpError::Unprocessable {
                    code: "hook_failed",
                    message: format!(
                        "hook `{entry}` failed with exit {:?} signal {:?}: {}",
                        out.exit_code,
                        out.signal,
                        out.stderr.trim()
                    ),
                    instance_id: Some(id),
                });
            }
        }
        Ok(())
    }
}

/// A cold create running in its own task. Dropped before the task's result was taken (the
/// request was cancelled), it waits for the task in the background and destroys the instance:
/// the client got an error, so nothing of that create may stay.
struct CreateWork {
    m: Arc<Manager>,
    slot: Arc<Slot>,
    handle: Option<tokio::task::JoinHandle<Result<Instance, OpError>>>,
}

impl Drop for CreateWork {
    fn drop(&mut self) {
        let Some(h) = self.handle.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (m, slot) = (self.m.clone(), self.slot.clone());
        rt.spawn(async move {
            let _ = h.await;
            let id = {
                let mut rec = slot.rec.lock().await;
                if rec.instance.state != SandboxState::Destroyed {
                    rec.instance.last_error = Some(
                        "the create request ended (request timeout or client gone) before the sandbox was ready".into(),
                    );
                }
                rec.instance.id.clone()
            };
            warn!(instance_id = %id, "create request abandoned; destroying the instance it started");
            if let Err(e) = m
                .destroy_slot(&slot, TerminationReason::SpawnFailed, None)
                .await
            {
                warn!(instance_id = %id, error = %e, "destroying an abandoned create failed");
            }
        });
    }
}

fn set_ttl(rec: &mut InstanceRecord, ttl: Option<u64>) {
    rec.instance.ttl_secs = ttl;
    rec.expires_at_ms = ttl.map(|t| now_ms() + t * 1000);
    rec.instance.expires_at = rec.expires_at_ms.map(rfc3339);
}

pub fn template_files(t: &TemplateRecord) -> TemplateFiles {
    TemplateFiles {
        id: t.id.clone(),
        rootfs_dir: t.rootfs_dir.clone(),
        rootfs_image: t.rootfs_image.clone(),
        kernel: t.kernel.clone(),
        initramfs: t.initramfs.clone(),
        snapshot_dir: t.snapshot_dir.clone(),
        ready_marker: t.ready_marker.clone(),
    }
}
