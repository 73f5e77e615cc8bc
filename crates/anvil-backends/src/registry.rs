//! The spawner registry: one backend per configured kind, each probed once at start.
//!
//! Adding a backend = its module + one arm in [`construct`].

use crate::{Backend, Probe};
use anvil_core::backend::BackendKind;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the daemon knows that backends need to be built.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// The backend's binary (`[backends].<kind>` in the config).
    pub binary: PathBuf,
    /// The static guest agent binary.
    pub agent: PathBuf,
    /// Firecracker's jailer, if configured.
    pub jailer: Option<PathBuf>,
    /// Cgroup root name under each hierarchy (`[cgroup].root`).
    pub cgroup_root: String,
    /// `auto`, `v1` or `v2` (`[cgroup].mode`).
    pub cgroup_mode: String,
    /// How long a sandbox may take to report ready.
    pub ready_timeout: Duration,
    /// The daemon's state directory (backends keep shared files below it).
    pub state_dir: PathBuf,
    /// Pre-started VMM processes to keep (`[pool].vmm_spares`; Firecracker only).
    pub vmm_spares: u32,
}

/// Builds the backend of `kind`. Kinds without an implementation get a backend that probes
/// unavailable and says so.
pub fn construct(kind: BackendKind, settings: &BackendSettings) -> Arc<dyn Backend> {
    match kind {
        BackendKind::Mock => Arc::new(crate::mock::MockBackend::new()),
        BackendKind::Bubblewrap => Arc::new(crate::bubblewrap::BubblewrapBackend::new(
            crate::bubblewrap::BwrapConfig {
                bwrap: settings.binary.clone(),
                agent: settings.agent.clone(),
                cgroups: crate::cgroup::CgroupConfig {
                    root_name: settings.cgroup_root.clone(),
                    base: None,
                },
                ready_timeout: settings.ready_timeout,
            },
        )),
        BackendKind::Firecracker => {
            match crate::firecracker::FirecrackerBackend::from_settings(settings) {
                Ok(b) => Arc::new(b),
                Err(e) => Arc::new(crate::mock::Unimplemented::broken(
                    BackendKind::Firecracker,
                    e.to_string(),
                )),
            }
        }
        other => Arc::new(crate::mock::Unimplemented::new(
            other,
            settings.binary.clone(),
        )),
    }
}

struct Entry {
    backend: Arc<dyn Backend>,
    probe: Probe,
}

/// Backends keyed by kind, with the probe result of each.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<BackendKind, Entry>,
}

impl Registry {
    /// Probes every backend (concurrently) and keeps them all, available or not.
    pub async fn build(backends: Vec<Arc<dyn Backend>>) -> Registry {
        let probes = futures::future::join_all(backends.iter().map(|b| {
            let b = b.clone();
            async move { b.probe().await }
        }))
        .await;
        let entries = backends
            .into_iter()
            .zip(probes)
            .map(|(backend, probe)| (backend.kind(), Entry { backend, probe }))
            .collect();
        Registry { entries }
    }

    /// The backend of `kind` if it is configured and probed available.
    pub fn get(&self, kind: BackendKind) -> Option<Arc<dyn Backend>> {
        self.entries
            .get(&kind)
            .filter(|e| e.probe.available)
            .map(|e| e.backend.clone())
    }

    /// The backend of `kind` whatever its probe said (for cleanup of old instances).
    pub fn get_any(&self, kind: BackendKind) -> Option<Arc<dyn Backend>> {
        self.entries.get(&kind).map(|e| e.backend.clone())
    }

    /// `Ok` if available, else why not (not configured, or the probe's reason).
    pub fn availability(&self, kind: BackendKind) -> Result<(), String> {
        match self.entries.get(&kind) {
            None => Err(format!("backend {kind} is not configured in [backends]")),
            Some(e) if e.probe.available => Ok(()),
            Some(e) => Err(format!(
                "backend {kind} is unavailable: {}",
                e.probe.reason.as_deref().unwrap_or("probe failed")
            )),
        }
    }

    pub fn probe(&self, kind: BackendKind) -> Option<&Probe> {
        self.entries.get(&kind).map(|e| &e.probe)
    }

    /// Every configured backend, in kind order.
    pub fn backends(&self) -> Vec<Arc<dyn Backend>> {
        self.entries.values().map(|e| e.backend.clone()).collect()
    }

    /// Every configured backend with its probe, in kind order.
    pub fn probes(&self) -> Vec<(BackendKind, Probe)> {
        self.entries
            .iter()
            .map(|(k, e)| (*k, e.probe.clone()))
            .collect()
    }
}
