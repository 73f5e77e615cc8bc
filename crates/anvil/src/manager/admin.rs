//! Daemon-level views and actions: reload, host view, gauges, directory listing.

use super::{Manager, OpError};
use crate::metrics::StateLabels;
use crate::model::{BackendView, CapacityView, FileEntryView, HostView};
use crate::policies::load_policy_dir;
use anvil_backends::agent::AgentClient;
use anvil_core::lifecycle::SandboxState;
use std::sync::Arc;
use tracing::{info, warn};

impl Manager {
    /// Reloads the policy directory atomically: on any error the old set stays and the error
    /// (naming file and reason) is returned.
    pub async fn reload_policies(self: &Arc<Self>) -> Result<Vec<String>, String> {
        let _g = self.reload_lock.lock().await;
        match load_policy_dir(&self.cfg) {
            Ok((set, warnings)) => {
                for w in warnings {
                    warn!("{w}");
                }
                let names: Vec<String> = set
                    .policies()
                    .iter()
                    .map(|p| p.policy_name.clone())
                    .collect();
                self.policies.store(Arc::new(set));
                self.undrain_all();
                info!(policies = ?names, "policies reloaded");
                self.wake_pools.notify_one();
                Ok(names)
            }
            Err(e) => {
                warn!(error = %e, "policy reload failed; keeping the previous policies");
                Err(e)
            }
        }
    }

    pub async fn host_view(&self) -> HostView {
        let backends = self
            .registry
            .probes()
            .into_iter()
            .map(|(k, p)| BackendView {
                backend: k,
                available: p.available,
                version: p.version,
                reason: p.reason,
                capabilities: self
                    .registry
                    .get_any(k)
                    .map(|b| b.capabilities())
                    .unwrap_or_default(),
            })
            .collect();
        let (total, avail) = crate::util::meminfo();
        HostView {
            backends,
            cgroup_mode: crate::util::cgroup_mode().to_string(),
            kvm: std::path::Path::new("/dev/kvm").exists(),
            capacity: CapacityView {
                max_instances: self.cfg.daemon.max_instances as u64,
                used: self.live_count().await,
                memory_total_bytes: total,
                memory_available_bytes: avail,
            },
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Recomputes the instance gauges (by state and backend) before a scrape.
    pub async fn refresh_gauges(&self) {
        self.metrics.instances.clear();
        for s in self.all_slots() {
            let r = s.rec.lock().await;
            if r.instance.state == SandboxState::Destroyed {
                continue;
            }
            self.metrics
                .instances
                .get_or_create(&StateLabels {
                    state: r.instance.state.to_string(),
                    backend: r.instance.backend.to_string(),
                })
                .inc();
        }
    }

    pub async fn list_dir(&self, id: &str, path: &str) -> Result<Vec<FileEntryView>, OpError> {
        super::ops::validate_path(path)?;
        let target = self.exec_target(id).await?;
        let entries = AgentClient::new(target.client.endpoint().clone())
            .list_dir(path)
            .await
            .map_err(|e| OpError::backend(id, "list", anvil_backends::BackendError::Agent(e)))?;
        Ok(entries
            .into_iter()
            .map(|e| FileEntryView {
                name: e.name,
                kind: format!("{:?}", e.kind).to_lowercase(),
                size: e.size,
                mode: e.mode,
            })
            .collect())
    }
}
