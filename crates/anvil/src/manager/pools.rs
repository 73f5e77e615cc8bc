//! Warm pools: which pools exist (from policies and sizing overrides), the refill loop,
//! eviction, drain. The bookkeeping itself (what to create or evict) is anvil-core's PoolBook.

use super::Manager;
use crate::metrics::PoolLabels;
use crate::model::{now_ms, PoolSizingRecord, PoolView, SizingRequest};
use anvil_core::backend::BackendKind;
use anvil_core::config::Config;
use anvil_core::lifecycle::TerminationReason;
use anvil_core::pool::{PoolBook, PoolKey, PoolSettings, PoolSizing};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

struct PoolEntry {
    book: PoolBook,
    /// Policy whose template and quotas warm instances are made with.
    policy: String,
    /// Drained by an operator: no refill until sizing is set again or policies reload.
    drained: bool,
}

pub struct Pools {
    entries: Mutex<BTreeMap<PoolKey, PoolEntry>>,
    overrides: Mutex<BTreeMap<(BackendKind, String), SizingRequest>>,
    refill: Arc<Semaphore>,
    enabled: bool,
    interval: Duration,
    settings: PoolSettings,
}

impl Pools {
    pub fn new(cfg: &Config) -> Pools {
        Pools {
            entries: Mutex::new(BTreeMap::new()),
            overrides: Mutex::new(BTreeMap::new()),
            refill: Arc::new(Semaphore::new(cfg.pool.refill_concurrency as usize)),
            enabled: cfg.pool.enabled,
            interval: cfg.pool.refill_interval.get(),
            settings: PoolSettings::from_config(&cfg.pool),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<PoolKey, PoolEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_book(&self, sizing: PoolSizing) -> PoolBook {
        PoolBook::with_settings(sizing, self.settings)
    }

    /// Takes the oldest warm instance of `key`, counting a hit or a miss.
    pub fn claim(&self, key: &PoolKey) -> Option<String> {
        self.entries().get_mut(key).and_then(|e| e.book.claim())
    }

    /// Takes the oldest warm instance of `key` for a reset (see `PoolBook::take_for_reset`).
    pub fn take_for_reset(&self, key: &PoolKey) -> Option<String> {
        self.entries()
            .get_mut(key)
            .and_then(|e| e.book.take_for_reset())
    }

    pub fn is_pooled(&self, key: &PoolKey) -> bool {
        self.entries().contains_key(key)
    }

    pub fn forget(&self, key: &PoolKey, id: &str) {
        if let Some(e) = self.entries().get_mut(key) {
            e.book.remove(id);
        }
    }

    pub fn add_warm(&self, key: &PoolKey, id: &str, now: u64) {
        if let Some(e) = self.entries().get_mut(key) {
            e.book.add_warm(id.to_string(), now);
        }
    }

    /// A warm instance found alive after a restart: its pool may not be configured yet.
    pub fn adopt_warm(&self, key: &PoolKey, id: &str, since: u64) {
        let mut entries = self.entries();
        let entry = entries.entry(key.clone()).or_insert_with(|| PoolEntry {
            book: self.new_book(PoolSizing::default()),
            policy: String::new(),
            drained: false,
        });
        entry.book.add_warm(id.to_string(), since);
    }

    /// Whether a reset instance may go back into `key` without exceeding `max`.
    pub fn has_room(&self, key: &PoolKey) -> bool {
        self.entries()
            .get(key)
            .is_some_and(|e| !e.drained && e.book.stats().warm_count < e.book.sizing().max)
    }

    pub fn restore_sizing(&self, rec: PoolSizingRecord) {
        self.overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((rec.backend, rec.workload_class), rec.sizing);
    }

    pub fn views(&self, backend: Option<BackendKind>, class: Option<&str>) -> Vec<PoolView> {
        self.entries()
            .iter()
            .filter(|(k, _)| {
                backend.is_none_or(|b| b == k.backend)
                    && class.is_none_or(|c| c == k.workload_class)
            })
            .map(|(k, e)| PoolView {
                key: k.clone(),
                stats: e.book.stats(),
            })
            .collect()
    }

    fn sizing_of(
        &self,
        backend: BackendKind,
        class: &str,
        policy: &anvil_core::policy::Policy,
        digest: &str,
    ) -> Option<PoolSizing> {
        let ov = self
            .overrides
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(backend, class.to_string()))
            .cloned();
        match ov {
            Some(o) if o.image_digest.as_deref().is_some_and(|d| d != digest) => None,
            Some(o) => Some(PoolSizing {
                min: o.min,
                target: o.target,
                max: o.max,
                enabled: o.enabled,
                image_digest: o.image_digest,
                warm_ttl_secs: o
                    .warm_ttl_secs
                    .unwrap_or(policy.pool.warm_ttl.get().as_secs()),
            }),
            None if policy.pool.enabled && self.enabled => Some(PoolSizing {
                min: policy.pool.min,
                target: policy.pool.target,
                max: policy.pool.max,
                enabled: true,
                image_digest: None,
                warm_ttl_secs: policy.pool.warm_ttl.get().as_secs(),
            }),
            None => None,
        }
    }
}

impl Manager {
    /// Validates and stores a sizing override for (backend, class); resumes a drained pool.
    pub async fn set_sizing(
        self: &Arc<Self>,
        backend: BackendKind,
        class: &str,
        req: SizingRequest,
    ) -> Result<Vec<PoolView>, super::OpError> {
        if req.min > req.target || req.target > req.max {
            return Err(super::OpError::BadRequest(format!(
                "sizing needs min <= target <= max (got min {}, target {}, max {})",
                req.min, req.target, req.max
            )));
        }
        if self.registry.availability(backend).is_err() {
            return Err(super::OpError::Unprocessable {
                code: "backend_unavailable",
                message: format!("backend {backend} is not available on this host"),
                instance_id: None,
            });
        }
        let rec = PoolSizingRecord {
            backend,
            workload_class: class.to_string(),
            sizing: req.clone(),
        };
        self.store
            .put_pool_sizing(&rec)
            .map_err(super::OpError::internal)?;
        self.pools.restore_sizing(rec);
        for (k, e) in self.pools.entries().iter_mut() {
            if k.backend == backend && k.workload_class == class {
                e.drained = false;
            }
        }
        self.reconcile_pools().await;
        Ok(self.pools.views(Some(backend), Some(class)))
    }

    /// Destroys every warm instance of (backend, class) and stops refilling it until sizing is
    /// set again or policies are reloaded.
    pub async fn drain(self: &Arc<Self>, backend: BackendKind, class: &str) -> Vec<String> {
        let ids: Vec<String> = {
            let mut entries = self.pools.entries();
            entries
                .iter_mut()
                .filter(|(k, _)| k.backend == backend && k.workload_class == class)
                .flat_map(|(_, e)| {
                    e.drained = true;
                    e.book.drain()
                })
                .collect()
        };
        let mut drained = Vec::new();
        for id in ids {
            match self.destroy(&id, TerminationReason::Drained).await {
                Ok(_) => drained.push(id),
                Err(e) => {
                    warn!(instance_id = %id, error = %e, "drain could not destroy warm instance")
                }
            }
        }
        drained
    }

    /// Clears the drained marks (policy reload).
    pub fn undrain_all(&self) {
        for e in self.pools.entries().values_mut() {
            e.drained = false;
        }
    }

    /// The refill loop: wakes on demand (claims, destroys) and every refill interval.
    pub async fn run_pools(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.wake_pools.notified() => {}
                _ = tokio::time::sleep(self.pools.interval) => {}
            }
            if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            self.reconcile_pools().await;
        }
    }

    /// Brings every pool towards its sizing: starts refills, evicts expired and excess warm
    /// instances, drops pools no policy wants any more.
    pub async fn reconcile_pools(self: &Arc<Self>) {
        let desired = self.desired_pools();
        let now = now_ms();
        let mut to_create = Vec::new();
        let mut to_evict = Vec::new();
        // Warm instances count against [daemon].max_instances like any other sandbox.
        let live = self.live_count().await;
        let mut room = u64::from(self.cfg.daemon.max_instances).saturating_sub(live);
        {
            let mut entries = self.pools.entries();
            // Refills in flight may not hold a slot yet: count them too (at worst a refill
            // waits for the next round).
            let in_flight: u64 = entries
                .values()
                .map(|e| u64::from(e.book.in_flight()))
                .sum();
            room = room.saturating_sub(in_flight);
            for (key, (policy, sizing)) in &desired {
                let e = entries.entry(key.clone()).or_insert_with(|| PoolEntry {
                    book: self.pools.new_book(sizing.clone()),
                    policy: policy.clone(),
                    drained: false,
                });
                e.policy = policy.clone();
                e.book.set_sizing(sizing.clone());
            }
            let desired_keys: BTreeSet<_> = desired.keys().cloned().collect();
            for (key, e) in entries.iter_mut() {
                if !desired_keys.contains(key) {
                    e.book.set_sizing(PoolSizing::default());
                }
                let plan = e.book.plan(now);
                to_evict.extend(plan.evict);
                if !e.drained && !e.policy.is_empty() {
                    for _ in 0..plan.create.min(u32::try_from(room).unwrap_or(u32::MAX)) {
                        room -= 1;
                        e.book.creation_started();
                        to_create.push((key.clone(), e.policy.clone()));
                    }
                }
            }
            entries.retain(|k, e| {
                desired_keys.contains(k) || e.book.stats().warm_count > 0 || e.book.in_flight() > 0
            });
            for (k, e) in entries.iter() {
                let l = PoolLabels {
                    backend: k.backend.to_string(),
                    workload_class: k.workload_class.clone(),
                };
                let st = e.book.stats();
                self.metrics
                    .pool_warm
                    .get_or_create(&l)
                    .set(st.warm_count as i64);
                self.metrics
                    .pool_target
                    .get_or_create(&l)
                    .set(st.target as i64);
            }
        }
        for id in to_evict {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.destroy(&id, TerminationReason::Evicted).await {
                    warn!(instance_id = %id, error = %e, "evicting warm instance failed");
                }
            });
        }
        for (key, policy) in to_create {
            let me = self.clone();
            let sem = self.pools.refill.clone();
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                let result = if me.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                    Err(super::OpError::internal("shutting down"))
                } else {
                    me.create_warm(&key, &policy).await
                };
                let ok = result.is_ok();
                match result {
                    Ok(id) => {
                        debug!(instance_id = %id, backend = %key.backend, class = %key.workload_class, "warm instance ready");
                        let mut entries = me.pools.entries();
                        match entries.get_mut(&key) {
                            Some(e) => {
                                e.book.creation_finished(true, now_ms());
                                e.book.add_warm(id, now_ms());
                            }
                            None => drop(entries),
                        }
                    }
                    Err(e) => {
                        warn!(backend = %key.backend, class = %key.workload_class, error = %e, "pool refill failed");
                        me.metrics
                            .pool_refill_failures_total
                            .get_or_create(&PoolLabels {
                                backend: key.backend.to_string(),
                                workload_class: key.workload_class.clone(),
                            })
                            .inc();
                        if let Some(e) = me.pools.entries().get_mut(&key) {
                            e.book.creation_finished(false, now_ms());
                        }
                    }
                }
                if ok {
                    me.wake_pools.notify_one();
                }
            });
        }
    }

    /// Pools the current policies (and sizing overrides) ask for, keyed by the backend and
    /// template each workload class resolves to now.
    fn desired_pools(&self) -> BTreeMap<PoolKey, (String, PoolSizing)> {
        let mut out = BTreeMap::new();
        let policies = self.policies.load();
        let labels = BTreeMap::new();
        for p in policies.policies() {
            for class in &p.matches.workload_class {
                // Only the policy that actually wins for this class owns its pool.
                let Ok(r) = self.resolve(class, &labels, None, None, None) else {
                    continue;
                };
                if r.policy.policy_name != p.policy_name {
                    continue;
                }
                let Some(sizing) = self.pools.sizing_of(r.backend, class, p, &r.image_digest)
                else {
                    continue;
                };
                if !sizing.enabled || sizing.max == 0 {
                    continue;
                }
                let key = PoolKey {
                    backend: r.backend,
                    workload_class: class.to_string(),
                    image_digest: r.image_digest.clone(),
                };
                out.insert(key, (p.policy_name.clone(), sizing));
            }
        }
        out
    }
}
