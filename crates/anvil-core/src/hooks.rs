//! Kernel/host hook registry (SPEC §6 `kernel_hooks`, `GET /v1/hooks`).
//!
//! A hook is a host mechanism a policy may require (overlayfs, cgroup freezer, user namespaces,
//! Firecracker memory templates, vsock, KVM). Each is provided by some backends ("owners"); the
//! daemon probes the host and records availability here. A policy's `kernel_hooks` are checked
//! against the selected backend, and `fallback_on_missing_hook` decides what a missing one does.

use crate::backend::{BackendKind, ResetMode};
use crate::policy::{FallbackOnMissingHook, HookStep, Policy, PolicyError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Names of the built-in hooks.
pub const HOOK_NAMES: [&str; 6] = [
    "overlayfs-rollback",
    "cgroup-freezer",
    "userns",
    "mm-template",
    "vsock",
    "kvm",
];

pub fn is_known_hook(name: &str) -> bool {
    HOOK_NAMES.contains(&name)
}

/// The hook a reset mode depends on, if any.
pub fn hook_for_reset_mode(mode: ResetMode) -> Option<&'static str> {
    match mode {
        ResetMode::MmTemplate => Some("mm-template"),
        ResetMode::OverlayfsRollback => Some("overlayfs-rollback"),
        ResetMode::FullRecreate => None,
    }
}

/// The reset mode to use when `requested` cannot be: `requested` itself if the backend supports
/// it and its hook is not missing, else the first mode the backend supports whose hook is not
/// missing. None = nothing usable.
pub fn degraded_reset_mode(
    requested: ResetMode,
    supported: &[ResetMode],
    missing_hooks: &[&str],
) -> Option<ResetMode> {
    let usable = |m: &ResetMode| {
        supported.contains(m)
            && match hook_for_reset_mode(*m) {
                Some(h) => !missing_hooks.contains(&h),
                None => true,
            }
    };
    if usable(&requested) {
        return Some(requested);
    }
    supported.iter().copied().find(usable)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HookEntry {
    description: &'static str,
    owners: Vec<BackendKind>,
    available: bool,
    reason: Option<String>,
}

/// `GET /v1/hooks` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookView {
    pub name: String,
    pub description: String,
    /// Backends that provide this hook.
    pub owners: Vec<BackendKind>,
    /// Whether the host probe found it usable.
    pub available: bool,
    /// Why it is unavailable (or a probe note).
    pub reason: Option<String>,
}

/// A required hook that the selected backend cannot provide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MissingHook {
    pub hook: String,
    pub reason: String,
}

/// Result of checking a policy's hooks against a backend (when not refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookCheck {
    pub backend: BackendKind,
    pub fallback: FallbackOnMissingHook,
    pub missing: Vec<MissingHook>,
    /// Human-readable notes for the decision.
    pub notes: Vec<String>,
}

impl HookCheck {
    fn missing_names(&self) -> Vec<&str> {
        self.missing.iter().map(|m| m.hook.as_str()).collect()
    }

    /// The reset mode to use on this backend, given the modes it supports. With `degrade`, a
    /// mode that cannot work (unsupported, or its hook missing) falls back to the first usable
    /// supported mode; with `fail`/`continue` it is an error, answered when a reset is asked for.
    /// Pushes a note when the mode changes.
    pub fn effective_reset_mode(
        &mut self,
        requested: ResetMode,
        supported: &[ResetMode],
    ) -> Result<ResetMode, String> {
        let missing = self.missing_names();
        let hook_missing = hook_for_reset_mode(requested).is_some_and(|h| missing.contains(&h));
        if supported.contains(&requested) && !hook_missing {
            return Ok(requested);
        }
        let why = if hook_missing {
            format!(
                "reset mode `{requested}` needs hook `{}`, missing on {}",
                hook_for_reset_mode(requested).unwrap_or_default(),
                self.backend
            )
        } else {
            format!("{} does not support reset mode `{requested}`", self.backend)
        };
        if self.fallback != FallbackOnMissingHook::Degrade {
            return Err(why);
        }
        match degraded_reset_mode(requested, supported, &missing) {
            Some(m) => {
                self.notes.push(format!("{why}; degraded to `{m}`"));
                Ok(m)
            }
            None => Err(format!("{why}; no other reset mode is usable")),
        }
    }
}

/// A policy requires hooks the backend lacks and says `fail`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy `{policy}` requires {} on {backend}", describe(.missing))]
pub struct HookError {
    pub policy: String,
    pub backend: BackendKind,
    pub missing: Vec<MissingHook>,
}

fn describe(missing: &[MissingHook]) -> String {
    missing
        .iter()
        .map(|m| format!("hook `{}` ({})", m.hook, m.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hook `{0}`")]
pub struct UnknownHook(pub String);

/// The hooks this daemon knows, with availability filled in by host probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRegistry {
    hooks: BTreeMap<&'static str, HookEntry>,
}

impl HookRegistry {
    /// All built-in hooks, each unavailable ("not probed") until the daemon says otherwise.
    pub fn builtin() -> Self {
        use BackendKind::*;
        let defs: [(&'static str, &'static str, Vec<BackendKind>); 6] = [
            (
                "overlayfs-rollback",
                "Writable overlay over the template rootfs; reset drops the upper layer",
                vec![Bubblewrap],
            ),
            (
                "cgroup-freezer",
                "Pause/resume by freezing the sandbox's cgroup",
                vec![Bubblewrap],
            ),
            (
                "userns",
                "Unprivileged user namespaces for the sandbox",
                vec![Bubblewrap],
            ),
            (
                "mm-template",
                "Start and reset microVMs by restoring a memory snapshot of the booted template",
                vec![Firecracker],
            ),
            (
                "vsock",
                "virtio-vsock channel between host and guest agent",
                vec![Firecracker],
            ),
            (
                "kvm",
                "Hardware virtualization via /dev/kvm",
                vec![Firecracker],
            ),
        ];
        let hooks = defs
            .into_iter()
            .map(|(name, description, owners)| {
                (
                    name,
                    HookEntry {
                        description,
                        owners,
                        available: false,
                        reason: Some("not probed".to_string()),
                    },
                )
            })
            .collect();
        HookRegistry { hooks }
    }

    /// Records a probe result. `reason` says why it is unavailable (or notes how it was found).
    pub fn set_available(
        &mut self,
        name: &str,
        available: bool,
        reason: Option<String>,
    ) -> Result<(), UnknownHook> {
        let e = self
            .hooks
            .get_mut(name)
            .ok_or_else(|| UnknownHook(name.to_string()))?;
        e.available = available;
        e.reason = reason;
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.hooks.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<HookView> {
        self.hooks.get_key_value(name).map(|(n, e)| view(n, e))
    }

    /// All hooks, sorted by name.
    pub fn list(&self) -> Vec<HookView> {
        self.hooks.iter().map(|(n, e)| view(n, e)).collect()
    }

    /// Why `name` cannot be used on `backend`, or None when it can.
    pub fn unusable_reason(&self, name: &str, backend: BackendKind) -> Option<String> {
        let Some(e) = self.hooks.get(name) else {
            return Some("unknown hook".to_string());
        };
        if !e.owners.contains(&backend) {
            let owners: Vec<_> = e.owners.iter().map(|o| o.as_str()).collect();
            return Some(format!(
                "not provided by {backend}; provided by {}",
                owners.join(", ")
            ));
        }
        if !e.available {
            return Some(match &e.reason {
                Some(r) => format!("unavailable on this host: {r}"),
                None => "unavailable on this host".to_string(),
            });
        }
        None
    }

    /// The policy's `kernel_hooks` that `backend` cannot provide.
    pub fn missing_for(&self, policy: &Policy, backend: BackendKind) -> Vec<MissingHook> {
        policy
            .select
            .kernel_hooks
            .iter()
            .filter_map(|h| {
                self.unusable_reason(h, backend).map(|reason| MissingHook {
                    hook: h.clone(),
                    reason,
                })
            })
            .collect()
    }

    /// For the selector: with `fallback_on_missing_hook = fail`, a backend lacking a required
    /// hook cannot serve the policy, so selection should move on. Returns the skip reason.
    pub fn selection_blocker(&self, policy: &Policy, backend: BackendKind) -> Option<String> {
        if policy.select.fallback_on_missing_hook != FallbackOnMissingHook::Fail {
            return None;
        }
        let missing = self.missing_for(policy, backend);
        (!missing.is_empty()).then(|| format!("requires {}", describe(&missing)))
    }

    /// Applies `fallback_on_missing_hook` for `policy` on `backend`.
    pub fn check(&self, policy: &Policy, backend: BackendKind) -> Result<HookCheck, HookError> {
        let missing = self.missing_for(policy, backend);
        let fallback = policy.select.fallback_on_missing_hook;
        let mut notes = Vec::new();
        for m in &missing {
            match fallback {
                FallbackOnMissingHook::Fail => {}
                FallbackOnMissingHook::Degrade => notes.push(format!(
                    "hook `{}` missing on {backend} ({}); degrading",
                    m.hook, m.reason
                )),
                FallbackOnMissingHook::Continue => notes.push(format!(
                    "hook `{}` missing on {backend} ({}); continuing without it",
                    m.hook, m.reason
                )),
            }
        }
        if fallback == FallbackOnMissingHook::Fail && !missing.is_empty() {
            return Err(HookError {
                policy: policy.policy_name.clone(),
                backend,
                missing,
            });
        }
        Ok(HookCheck {
            backend,
            fallback,
            missing,
            notes,
        })
    }
}

fn view(name: &str, e: &HookEntry) -> HookView {
    HookView {
        name: name.to_string(),
        description: e.description.to_string(),
        owners: e.owners.clone(),
        available: e.available,
        reason: e.reason.clone(),
    }
}

/// Checks a policy's hook names against `registry`: every `kernel_hooks` entry and every hook
/// step of `[hooks.*].sequence` must be registered, and with `fallback_on_missing_hook = fail`
/// each kernel hook must be provided by at least one backend of `backend_priority` (otherwise
/// the policy could never be served).
pub fn validate_policy_hooks(policy: &Policy, registry: &HookRegistry) -> Result<(), PolicyError> {
    let invalid = |key: &str, reason: String| PolicyError::Invalid {
        file: policy.origin.clone(),
        key: key.to_string(),
        reason,
    };
    let known = || {
        registry
            .hooks
            .keys()
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    };
    for h in &policy.select.kernel_hooks {
        let Some(e) = registry.hooks.get(h.as_str()) else {
            return Err(invalid(
                "select.kernel_hooks",
                format!("unknown hook `{h}` (known: {})", known()),
            ));
        };
        if policy.select.fallback_on_missing_hook == FallbackOnMissingHook::Fail
            && !policy
                .select
                .backend_priority
                .iter()
                .any(|b| e.owners.contains(b))
        {
            let owners: Vec<_> = e.owners.iter().map(|o| o.as_str()).collect();
            return Err(invalid(
                "select.kernel_hooks",
                format!(
                    "hook `{h}` is provided only by {}, none of which is in select.backend_priority, and fallback_on_missing_hook is `fail`",
                    owners.join(", ")
                ),
            ));
        }
    }
    for (event, seq) in policy.hooks.events() {
        for step in &seq.sequence {
            if let HookStep::Hook(name) = step {
                if !registry.contains(name) {
                    return Err(invalid(
                        &format!("hooks.{event}.sequence"),
                        format!(
                            "unknown hook `{name}` (known: {}; or `exec:<command>`)",
                            known()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(hooks: &[&str], backends: &[&str], fallback: &str) -> Policy {
        let q = |v: &[&str]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        Policy::from_toml(
            &format!(
                "manifest_version = 1\npolicy_name = \"p\"\npriority = 1\n[match]\nworkload_class = \"c\"\n[select]\nbackend_priority = [{}]\nkernel_hooks = [{}]\nfallback_on_missing_hook = \"{fallback}\"\n",
                q(backends),
                q(hooks)
            ),
            Path::new("/p/p.toml"),
        )
        .unwrap()
    }

    fn probed() -> HookRegistry {
        let mut r = HookRegistry::builtin();
        for h in HOOK_NAMES {
            r.set_available(h, true, None).unwrap();
        }
        r
    }

    #[test]
    fn builtin_registry_lists_all_hooks_unprobed() {
        let r = HookRegistry::builtin();
        let l = r.list();
        assert_eq!(l.len(), HOOK_NAMES.len());
        let mut names: Vec<_> = l.iter().map(|h| h.name.as_str()).collect();
        names.sort();
        let mut want = HOOK_NAMES.to_vec();
        want.sort();
        assert_eq!(names, want);
        assert!(l
            .iter()
            .all(|h| !h.available && h.reason.as_deref() == Some("not probed")));
        assert_eq!(
            r.get("mm-template").unwrap().owners,
            vec![BackendKind::Firecracker]
        );
        assert_eq!(
            r.get("userns").unwrap().owners,
            vec![BackendKind::Bubblewrap]
        );
        assert!(r.clone().set_available("nope", true, None).is_err());
        let j = serde_json::to_value(&l[0]).unwrap();
        assert!(j.get("owners").is_some() && j.get("available").is_some());
    }

    #[test]
    fn fail_refuses_with_hook_and_reason() {
        let mut r = probed();
        let p = policy(&["mm-template"], &["firecracker", "bubblewrap"], "fail");
        assert!(r
            .check(&p, BackendKind::Firecracker)
            .unwrap()
            .missing
            .is_empty());
        let e = r
            .check(&p, BackendKind::Bubblewrap)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mm-template") && e.contains("not provided by bubblewrap"),
            "{e}"
        );
        r.set_available("mm-template", false, Some("snapshot restore failed".into()))
            .unwrap();
        let e = r
            .check(&p, BackendKind::Firecracker)
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshot restore failed"), "{e}");
        assert!(r
            .selection_blocker(&p, BackendKind::Firecracker)
            .unwrap()
            .contains("mm-template"));
    }

    #[test]
    fn degrade_notes_and_degrades_reset_mode() {
        let r = probed();
        let p = policy(&["mm-template"], &["firecracker", "bubblewrap"], "degrade");
        assert!(r.selection_blocker(&p, BackendKind::Bubblewrap).is_none());
        let mut c = r.check(&p, BackendKind::Bubblewrap).unwrap();
        assert_eq!(c.missing.len(), 1);
        assert!(c.notes[0].contains("degrading"), "{:?}", c.notes);
        let supported = [ResetMode::OverlayfsRollback, ResetMode::FullRecreate];
        assert_eq!(
            c.effective_reset_mode(ResetMode::MmTemplate, &supported)
                .unwrap(),
            ResetMode::OverlayfsRollback
        );
        assert!(c
            .notes
            .last()
            .unwrap()
            .contains("degraded to `overlayfs-rollback`"));
        // A supported mode is kept.
        assert_eq!(
            c.effective_reset_mode(ResetMode::FullRecreate, &supported)
                .unwrap(),
            ResetMode::FullRecreate
        );
        assert!(c.effective_reset_mode(ResetMode::MmTemplate, &[]).is_err());
    }

    #[test]
    fn degrade_on_owner_with_unavailable_hook() {
        let mut r = probed();
        r.set_available("mm-template", false, Some("no snapshot support".into()))
            .unwrap();
        let p = policy(&["mm-template"], &["firecracker"], "degrade");
        let mut c = r.check(&p, BackendKind::Firecracker).unwrap();
        let supported = [ResetMode::MmTemplate, ResetMode::FullRecreate];
        assert_eq!(
            c.effective_reset_mode(ResetMode::MmTemplate, &supported)
                .unwrap(),
            ResetMode::FullRecreate
        );
    }

    #[test]
    fn continue_notes_but_keeps_mode() {
        let r = probed();
        let p = policy(&["mm-template"], &["bubblewrap"], "continue");
        let mut c = r.check(&p, BackendKind::Bubblewrap).unwrap();
        assert!(
            c.notes[0].contains("continuing without it"),
            "{:?}",
            c.notes
        );
        let e = c
            .effective_reset_mode(ResetMode::MmTemplate, &[ResetMode::OverlayfsRollback])
            .unwrap_err();
        assert!(e.contains("mm-template"), "{e}");
    }

    #[test]
    fn degraded_reset_mode_rules() {
        use ResetMode::*;
        assert_eq!(
            degraded_reset_mode(MmTemplate, &[MmTemplate], &[]),
            Some(MmTemplate)
        );
        assert_eq!(
            degraded_reset_mode(MmTemplate, &[MmTemplate, FullRecreate], &["mm-template"]),
            Some(FullRecreate)
        );
        assert_eq!(
            degraded_reset_mode(MmTemplate, &[OverlayfsRollback, FullRecreate], &[]),
            Some(OverlayfsRollback)
        );
        assert_eq!(
            degraded_reset_mode(MmTemplate, &[MmTemplate], &["mm-template"]),
            None
        );
    }

    #[test]
    fn validate_policy_hooks_rejects_unreachable_hooks() {
        let r = HookRegistry::builtin();
        let p = policy(&["mm-template"], &["firecracker"], "fail");
        validate_policy_hooks(&p, &r).unwrap();
        // Policy::from_toml runs the same check against the built-in registry.
        let text = "manifest_version = 1\npolicy_name = \"p\"\npriority = 1\n[match]\nworkload_class = \"c\"\n[select]\nbackend_priority = [\"bubblewrap\"]\nkernel_hooks = [\"kvm\"]\n";
        let e = Policy::from_toml(text, Path::new("/p/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/p/x.toml") && e.contains("select.kernel_hooks") && e.contains("kvm"),
            "{e}"
        );
        // With degrade it is allowed.
        policy(&["kvm"], &["bubblewrap"], "degrade");
    }
}
