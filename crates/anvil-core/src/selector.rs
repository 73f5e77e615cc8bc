//! Backend selection (SPEC §7): walk a policy's `backend_priority` and pick the first backend
//! that is available, recording why each earlier one was skipped.
//!
//! "Available" is the daemon's judgement, passed in as a closure: probe result, whether the
//! backend is configured, whether the template it would use is ready, required hooks, ...

use crate::backend::BackendKind;
use crate::policy::Policy;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Whether a backend can serve a request right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// Not usable, with the reason recorded in the decision.
    Unavailable(String),
}

impl Availability {
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Availability::Unavailable(reason.into())
    }
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available)
    }
}

/// A backend passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Skipped {
    pub backend: BackendKind,
    pub reason: String,
}

/// How a sandbox's backend was chosen (returned by create).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    /// Name of the policy that matched.
    pub policy: String,
    /// The chosen backend; None = none available (HTTP 503).
    pub backend: Option<BackendKind>,
    /// Backends tried before the chosen one (all of them when none was chosen).
    pub skipped: Vec<Skipped>,
    /// Anything else worth knowing (hook fallbacks, degraded reset mode, ...).
    pub notes: Vec<String>,
}

impl Decision {
    /// The message for a 503 when no backend was chosen.
    pub fn unavailable_message(&self) -> String {
        let reasons: Vec<String> = self
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.backend, s.reason))
            .collect();
        format!(
            "no backend available for policy `{}` ({})",
            self.policy,
            reasons.join("; ")
        )
    }
}

/// Picks the first available backend of `policy.select.backend_priority`.
pub fn select(policy: &Policy, probe: &dyn Fn(BackendKind) -> Availability) -> Decision {
    let mut skipped = Vec::new();
    for &backend in &policy.select.backend_priority {
        match probe(backend) {
            Availability::Available => {
                return Decision {
                    policy: policy.policy_name.clone(),
                    backend: Some(backend),
                    skipped,
                    notes: Vec::new(),
                }
            }
            Availability::Unavailable(reason) => skipped.push(Skipped { backend, reason }),
        }
    }
    Decision {
        policy: policy.policy_name.clone(),
        backend: None,
        skipped,
        notes: vec!["no backend in select.backend_priority is available".to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;
    use BackendKind::*;

    fn policy(order: &[&str]) -> Policy {
        let list: Vec<_> = order.iter().map(|b| format!("\"{b}\"")).collect();
        Policy::from_toml(
            &format!(
                "manifest_version = 1\npolicy_name = \"pick\"\npriority = 0\n[match]\nworkload_class = \"c\"\n[select]\nbackend_priority = [{}]\n",
                list.join(",")
            ),
            Path::new("/p/pick.toml"),
        )
        .unwrap()
    }

    /// A host description like the daemon builds: configured binaries and template status.
    struct Host {
        configured: BTreeMap<BackendKind, bool>,
        template_failed: Option<(BackendKind, &'static str)>,
    }

    impl Host {
        fn probe(&self, b: BackendKind) -> Availability {
            match self.configured.get(&b) {
                None => return Availability::unavailable("not configured"),
                Some(false) => return Availability::unavailable("binary not found"),
                Some(true) => {}
            }
            if let Some((tb, reason)) = self.template_failed {
                if tb == b {
                    return Availability::unavailable(format!("template busybox failed: {reason}"));
                }
            }
            Availability::Available
        }
    }

    fn host(present: &[BackendKind], missing: &[BackendKind]) -> Host {
        let mut configured = BTreeMap::new();
        for &b in present {
            configured.insert(b, true);
        }
        for &b in missing {
            configured.insert(b, false);
        }
        Host {
            configured,
            template_failed: None,
        }
    }

    #[test]
    fn first_available_wins_in_policy_order() {
        let h = host(&[Firecracker, Bubblewrap], &[]);
        let d = select(&policy(&["firecracker", "bubblewrap"]), &|b| h.probe(b));
        assert_eq!(d.backend, Some(Firecracker));
        assert!(d.skipped.is_empty());
        assert_eq!(d.policy, "pick");
        // Reversed order, same host: the other one.
        let d = select(&policy(&["bubblewrap", "firecracker"]), &|b| h.probe(b));
        assert_eq!(d.backend, Some(Bubblewrap));
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn missing_binary_is_skipped_with_reason() {
        let h = host(&[Bubblewrap], &[Firecracker]);
        let d = select(&policy(&["firecracker", "bubblewrap"]), &|b| h.probe(b));
        assert_eq!(d.backend, Some(Bubblewrap));
        assert_eq!(
            d.skipped,
            vec![Skipped {
                backend: Firecracker,
                reason: "binary not found".into()
            }]
        );
    }

    #[test]
    fn failed_template_is_skipped_with_reason() {
        let mut h = host(&[Firecracker, Bubblewrap], &[]);
        h.template_failed = Some((Firecracker, "kernel missing"));
        let d = select(&policy(&["firecracker", "bubblewrap", "mock"]), &|b| {
            h.probe(b)
        });
        assert_eq!(d.backend, Some(Bubblewrap));
        assert_eq!(d.skipped.len(), 1);
        assert_eq!(
            d.skipped[0].reason,
            "template busybox failed: kernel missing"
        );
    }

    #[test]
    fn none_available_records_every_reason() {
        let h = host(&[], &[Bubblewrap]);
        let d = select(&policy(&["firecracker", "bubblewrap"]), &|b| h.probe(b));
        assert_eq!(d.backend, None);
        assert_eq!(d.skipped.len(), 2);
        assert_eq!(d.skipped[0].reason, "not configured");
        assert_eq!(d.skipped[1].reason, "binary not found");
        assert_eq!(d.notes.len(), 1);
        let m = d.unavailable_message();
        assert!(
            m.contains("`pick`")
                && m.contains("firecracker: not configured")
                && m.contains("bubblewrap: binary not found"),
            "{m}"
        );
    }

    #[test]
    fn probe_is_called_only_until_a_backend_is_found() {
        let calls = std::cell::RefCell::new(Vec::new());
        let d = select(&policy(&["mock", "bubblewrap", "firecracker"]), &|b| {
            calls.borrow_mut().push(b);
            if b == Bubblewrap {
                Availability::Available
            } else {
                Availability::unavailable("no")
            }
        });
        assert_eq!(d.backend, Some(Bubblewrap));
        assert_eq!(*calls.borrow(), vec![Mock, Bubblewrap]);
    }

    #[test]
    fn decision_wire_shape() {
        let h = host(&[Bubblewrap], &[Firecracker]);
        let d = select(&policy(&["firecracker", "bubblewrap"]), &|b| h.probe(b));
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({
                "policy": "pick",
                "backend": "bubblewrap",
                "skipped": [{"backend": "firecracker", "reason": "binary not found"}],
                "notes": []
            })
        );
    }
}
