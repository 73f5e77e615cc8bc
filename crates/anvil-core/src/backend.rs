//! Backend kinds and capability flags (SPEC §7).

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// Every isolation backend anvil knows by name. Kinds without an implementation probe as
/// unavailable, with that reason.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Firecracker,
    Gvisor,
    GvisorSubstrate,
    Rund,
    KataFc,
    KataClh,
    KataQemu,
    Runc,
    Bubblewrap,
    LinuxSandbox,
    Landlock,
    /// Test-only backend, never chosen unless configured.
    Mock,
}

impl BackendKind {
    pub const ALL: [BackendKind; 12] = [
        BackendKind::Firecracker,
        BackendKind::Gvisor,
        BackendKind::GvisorSubstrate,
        BackendKind::Rund,
        BackendKind::KataFc,
        BackendKind::KataClh,
        BackendKind::KataQemu,
        BackendKind::Runc,
        BackendKind::Bubblewrap,
        BackendKind::LinuxSandbox,
        BackendKind::Landlock,
        BackendKind::Mock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Gvisor => "gvisor",
            BackendKind::GvisorSubstrate => "gvisor-substrate",
            BackendKind::Rund => "rund",
            BackendKind::KataFc => "kata-fc",
            BackendKind::KataClh => "kata-clh",
            BackendKind::KataQemu => "kata-qemu",
            BackendKind::Runc => "runc",
            BackendKind::Bubblewrap => "bubblewrap",
            BackendKind::LinuxSandbox => "linux-sandbox",
            BackendKind::Landlock => "landlock",
            BackendKind::Mock => "mock",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = BackendKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown backend `{s}` (known: {})", names.join(", "))
            })
    }
}

/// How an instance is brought back to a clean state between episodes (policy `[pool].reset_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ResetMode {
    /// Restore the template's memory snapshot (VM backends).
    MmTemplate,
    /// Kill everything, drop the overlay's upper layer, start again (namespace backends).
    OverlayfsRollback,
    /// Destroy and create anew.
    FullRecreate,
}

impl ResetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetMode::MmTemplate => "mm-template",
            ResetMode::OverlayfsRollback => "overlayfs-rollback",
            ResetMode::FullRecreate => "full-recreate",
        }
    }
}

impl fmt::Display for ResetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kind of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// The writable filesystem layer (namespace backends).
    Filesystem,
    /// Memory + device state (VM backends).
    Memory,
}

/// What a backend can do. The API answers 409/422 for anything not listed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Capabilities {
    pub exec: bool,
    pub files: bool,
    pub pause: bool,
    pub checkpoint_filesystem: bool,
    pub checkpoint_memory: bool,
    pub fork: bool,
    pub rollback: bool,
    pub reset_modes: Vec<ResetMode>,
}

impl Capabilities {
    pub fn supports_reset(&self, mode: ResetMode) -> bool {
        self.reset_modes.contains(&mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in BackendKind::ALL {
            assert_eq!(k.as_str().parse::<BackendKind>().unwrap(), k);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert!("vmware"
            .parse::<BackendKind>()
            .unwrap_err()
            .contains("vmware"));
    }
}
