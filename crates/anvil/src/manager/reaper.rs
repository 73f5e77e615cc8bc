//! The reaper: destroys instances whose TTL has passed and forgets old tombstones.

use super::Manager;
use crate::model::now_ms;
use anvil_core::lifecycle::{SandboxState, TerminationReason};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How long a destroyed instance stays visible (GET shows its termination reason).
const TOMBSTONE_MS: u64 = 3600 * 1000;
/// At most this many destroyed instances are kept, oldest forgotten first.
const MAX_TOMBSTONES: usize = 1000;

impl Manager {
    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            self.reap_once().await;
        }
    }

    pub async fn reap_once(self: &Arc<Self>) {
        let now = now_ms();
        let mut expired = Vec::new();
        let mut tombstones = Vec::new();
        for s in self.all_slots() {
            let Ok(r) = s.rec.try_lock() else { continue };
            match r.instance.state {
                SandboxState::Destroyed => {
                    let at = r
                        .instance
                        .destroyed_at
                        .as_deref()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.timestamp_millis() as u64)
                        .unwrap_or(0);
                    tombstones.push((at, r.instance.id.clone()));
                }
                SandboxState::Warm => {}
                _ => {
                    if r.expires_at_ms.is_some_and(|e| e <= now) {
                        expired.push(r.instance.id.clone());
                    }
                }
            }
        }
        for id in expired {
            if let Err(e) = self.destroy(&id, TerminationReason::TtlExpired).await {
                warn!(instance_id = %id, error = %e, "TTL destroy failed");
            }
        }
        tombstones.sort();
        let excess = tombstones.len().saturating_sub(MAX_TOMBSTONES);
        for (i, (at, id)) in tombstones.into_iter().enumerate() {
            if (i < excess || at + TOMBSTONE_MS <= now) && self.store.delete_instance(&id).is_ok() {
                self.remove_slot(&id);
            }
        }
    }
}
