//! Start-up: build backends from probes, load the store, re-adopt live sandboxes and clean up
//! the rest.

use super::{pools::Pools, Manager, Slot};
use crate::metrics::Metrics;
use crate::model::{now_ms, InstanceRecord};
use crate::policies::load_policy_dir;
use crate::store::Store;
use anvil_backends::registry::Registry;
use anvil_backends::registry::{construct, BackendSettings};
use anvil_core::config::Config;
use anvil_core::hooks::HookRegistry;
use anvil_core::lifecycle::{SandboxState, TerminationReason};
use anvil_core::template::TemplateRegistry;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{Notify, Semaphore};
use tracing::{error, info, warn};

/// Finds the static guest agent: the configured path, else next to the `anvil` executable,
/// else where `scripts/build-agent.sh` puts it in a cargo target dir.
pub fn find_agent(cfg: &Config) -> PathBuf {
    if let Some(p) = &cfg.daemon.agent_binary {
        return p.clone();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [
        dir.join("anvil-agent"),
        dir.join("../x86_64-unknown-linux-gnu/release/anvil-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/release/anvil-agent"),
        PathBuf::from("/usr/libexec/anvil/anvil-agent"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

pub fn backend_settings(cfg: &Config, kind: anvil_core::backend::BackendKind) -> BackendSettings {
    BackendSettings {
        binary: cfg
            .backends
            .binary(kind)
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        agent: find_agent(cfg),
        jailer: cfg.backends.jailer.clone(),
        cgroup_root: cfg.cgroup.root.clone(),
        cgroup_mode: cfg.cgroup.mode.as_str().to_string(),
        ready_timeout: cfg.template.ready_timeout.get(),
        state_dir: cfg.daemon.state_dir.clone(),
        vmm_spares: cfg.pool.vmm_spares,
    }
}

/// `[cgroup].mode`: `auto` takes what the host has; `v1`/`v2` insist on it and refuse to start
/// on a host without it (a hybrid host has v1 controllers).
fn check_cgroup_mode(cfg: &Config) -> Result<(), String> {
    let host = crate::util::cgroup_mode();
    let wanted = cfg.cgroup.mode.as_str();
    let ok = match wanted {
        "v1" => matches!(host, "v1" | "hybrid"),
        "v2" => host == "v2",
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "[cgroup].mode = \"{wanted}\" but this host's cgroup layout is {host}"
        ))
    }
}

/// Builds the registry of every configured backend, probed.
/// `[cgroup].favor_dynmods`: best effort; sandboxes work without it, only slower to start.
fn favor_dynmods() {
    use anvil_backends::cgroup::dynmods::{enable, Dynmods};
    let unified = match anvil_backends::cgroup::detect::from_proc() {
        Ok(layout) => layout.unified,
        Err(_) => None,
    };
    let Some(mount) = unified else {
        info!("no cgroup2 mount: favordynmods not applicable (cgroup migrations may wait for an RCU grace period)");
        return;
    };
    match enable(&mount) {
        Ok(Dynmods::AlreadyOn) => {
            info!(mount = %mount.display(), "cgroup2 already mounted with favordynmods")
        }
        Ok(Dynmods::Enabled) => {
            info!(mount = %mount.display(), "remounted cgroup2 with favordynmods: moving a sandbox into its cgroup no longer waits for an RCU grace period")
        }
        Err(e) => {
            warn!(mount = %mount.display(), error = %e, "could not enable favordynmods; sandbox starts pay an RCU grace period each (set [cgroup].favor_dynmods = false to silence)")
        }
    }
}

pub async fn build_registry(cfg: &Config) -> Registry {
    let backends = cfg
        .backends
        .configured()
        .map(|k| construct(k, &backend_settings(cfg, k)))
        .collect();
    Registry::build(backends).await
}

impl Manager {
    /// Builds the manager: state dirs, store, policies, backends; then re-adopts what the
    /// store says is alive.
    pub async fn start(cfg: Config, config_path: PathBuf) -> Result<Arc<Manager>, String> {
        check_cgroup_mode(&cfg)?;
        if cfg.cgroup.favor_dynmods {
            favor_dynmods();
        }
        let state_dir = cfg.daemon.state_dir.clone();
        for d in [
            state_dir.clone(),
            state_dir.join("instances"),
            state_dir.join("checkpoints"),
            cfg.storage_templates_dir(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| format!("cannot create state directory {}: {e}", d.display()))?;
        }
        let store = Store::open(&state_dir).map_err(|e| e.to_string())?;
        let (policies, warnings) = load_policy_dir(&cfg)?;
        for w in warnings {
            warn!("{w}");
        }
        let registry = build_registry(&cfg).await;
        for (kind, probe) in registry.probes() {
            if probe.available {
                info!(backend = %kind, version = probe.version.as_deref().unwrap_or("?"), "backend available");
            } else {
                warn!(backend = %kind, reason = probe.reason.as_deref().unwrap_or("?"), "backend unavailable");
            }
        }
        let mut hooks = HookRegistry::builtin();
        super::create::fill_hook_availability(&mut hooks, &registry);
        let permits = cfg.limits.max_concurrent_creates as usize;
        let pools = Pools::new(&cfg);
        let m = Arc::new(Manager {
            config_path,
            store,
            registry,
            policies: ArcSwap::from_pointee(policies),
            hooks,
            templates: RwLock::new(TemplateRegistry::default()),
            metrics: Metrics::new(),
            slots: RwLock::new(HashMap::new()),
            checkpoints: Mutex::new(HashMap::new()),
            restoring: Mutex::new(HashMap::new()),
            pools,
            create_permits: Semaphore::new(permits),
            shutting_down: AtomicBool::new(false),
            wake_pools: Notify::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            cfg,
        });
        m.recover().await?;
        for b in m.registry.backends() {
            b.activate().await;
        }
        Ok(m)
    }

    async fn recover(self: &Arc<Self>) -> Result<(), String> {
        let loaded = self.store.load().map_err(|e| e.to_string())?;
        for c in &loaded.corrupt {
            error!(table = c.table, key = %c.key, error = %c.error, "corrupt state store record; dropping it");
            if let Err(e) = self.store.drop_corrupt(c) {
                error!(error = %e, "could not drop corrupt record");
            }
        }
        {
            let mut reg = self.templates.write().unwrap_or_else(|e| e.into_inner());
            for t in loaded.templates {
                let name = t.name.clone();
                if let Err(e) = reg.insert(t) {
                    error!(template = %name, error = %e, "stored template could not be registered");
                }
            }
        }
        {
            let mut cks = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
            for c in loaded.checkpoints {
                cks.insert(c.checkpoint.checkpoint_id.clone(), c);
            }
        }
        for s in loaded.pool_sizing {
            self.pools.restore_sizing(s);
        }
        let (mut adopted, mut lost) = (0, 0);
        for rec in loaded.instances {
            let id = rec.instance.id.clone();
            match self.recover_one(rec).await {
                Ok(true) => adopted += 1,
                Ok(false) => lost += 1,
                Err(e) => {
                    lost += 1;
                    error!(instance_id = %id, error = %e, "could not recover instance");
                }
            }
        }
        if adopted + lost > 0 {
            info!(adopted, lost, "recovered instances from the state store");
        }
        self.cleanup_orphan_dirs();
        Ok(())
    }

    /// Re-adopts one stored instance. Returns whether it is alive.
    async fn recover_one(self: &Arc<Self>, mut rec: InstanceRecord) -> Result<bool, String> {
        let id = rec.instance.id.clone();
        let state = rec.instance.state;
        if state == SandboxState::Destroyed {
            self.insert_slot(&id, Slot::new(rec));
            return Ok(false);
        }
        let backend = self.registry.get_any(rec.instance.backend);
        let alive = match (&rec.runtime, &backend) {
            // Half-created when the daemon died: never acknowledged, clean it up.
            (_, _)
                if matches!(
                    state,
                    SandboxState::Pending | SandboxState::Creating | SandboxState::Reset
                ) =>
            {
                let cleaned = match (&rec.runtime, &backend) {
                    (Some(rt), Some(b)) => b.destroy(rt).await,
                    // No runtime recorded yet: the backend may still have started processes,
                    // mounted and made a cgroup under the spec's names.
                    (None, Some(b)) => b.cleanup_unstarted(&rec.spec).await,
                    (_, None) => Ok(()),
                };
                if let Err(e) = cleaned {
                    warn!(instance_id = %id, error = %e, "cleaning up a half-created instance failed");
                }
                false
            }
            (Some(rt), Some(b)) => b.adopt(rt).await.unwrap_or_else(|e| {
                warn!(instance_id = %id, error = %e, "adoption failed");
                false
            }),
            // Hibernated: nothing runs, the checkpoint is on disk.
            (None, _) if state == SandboxState::Checkpointed => true,
            _ => false,
        };
        let slot = Slot::new(rec.clone());
        self.insert_slot(&id, slot.clone());
        if alive {
            if let Some(rt) = rec.runtime.clone() {
                self.supervise(&slot, rt);
            }
            if state == SandboxState::Warm {
                if let Some(key) = &rec.instance.pool {
                    self.pools
                        .adopt_warm(key, &id, rec.warm_since_ms.unwrap_or_else(now_ms));
                }
            }
            info!(instance_id = %id, state = %state, "re-adopted instance");
            return Ok(true);
        }
        let dir = rec.spec.instance_dir.clone();
        // Never recurse into a directory with something mounted under it.
        if dir.exists() && rec.runtime.is_none() && !crate::util::has_mounts_under(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        rec.runtime = None;
        rec.instance.state = SandboxState::Destroyed;
        rec.instance.termination_reason = Some(TerminationReason::LostOnRestart);
        rec.instance.destroyed_at = Some(crate::model::rfc3339(now_ms()));
        self.store.put_instance(&rec).map_err(|e| e.to_string())?;
        *slot.rec.lock().await = rec;
        slot.mark_dead();
        warn!(instance_id = %id, was = %state, "instance lost across restart; cleaned up");
        Ok(false)
    }

    /// Instance directories that no record owns (a crash between mkdir and the first write).
    fn cleanup_orphan_dirs(&self) {
        let dir = self.state_dir().join("instances");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let known: std::collections::HashSet<PathBuf> = self
            .all_slots()
            .iter()
            .filter_map(|s| s.rec.try_lock().ok().map(|r| r.spec.instance_dir.clone()))
            .collect();
        for e in rd.flatten() {
            let p = e.path();
            if !known.contains(&p) && !crate::util::has_mounts_under(&p) {
                warn!(path = %p.display(), "removing orphan instance directory");
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}
