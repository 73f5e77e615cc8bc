//! The instance lifecycle state machine (SPEC §3).

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// States of a sandbox instance, kebab-case on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxState {
    Pending,
    Creating,
    Running,
    Paused,
    Checkpointed,
    Reset,
    Warm,
    Destroyed,
}

impl SandboxState {
    pub const ALL: [SandboxState; 8] = [
        SandboxState::Pending,
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Checkpointed,
        SandboxState::Reset,
        SandboxState::Warm,
        SandboxState::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Checkpointed => "checkpointed",
            SandboxState::Reset => "reset",
            SandboxState::Warm => "warm",
            SandboxState::Destroyed => "destroyed",
        }
    }

    /// Whether `self -> to` is a legal transition (SPEC §3 table).
    pub fn can_transition_to(self, to: SandboxState) -> bool {
        use SandboxState::*;
        if to == Destroyed {
            return self != Destroyed;
        }
        matches!(
            (self, to),
            (Pending, Creating)
                | (Creating, Running)
                | (Creating, Warm)
                | (Running, Paused)
                | (Running, Reset)
                | (Paused, Running)
                | (Paused, Checkpointed)
                | (Checkpointed, Running)
                | (Reset, Warm)
                | (Reset, Running)
                | (Warm, Creating)
        )
    }

    /// Checks a transition, returning an error that names both states.
    pub fn transition(self, to: SandboxState) -> Result<SandboxState, IllegalTransition> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }

    pub fn is_terminal(self) -> bool {
        self == SandboxState::Destroyed
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state `{s}`"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition from `{from}` to `{to}`")]
pub struct IllegalTransition {
    pub from: SandboxState,
    pub to: SandboxState,
}

/// How an instance came to be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StartPath {
    /// Spawned from scratch.
    Cold,
    /// Claimed from a warm pool.
    Warm,
    /// Restored from a snapshot or checkpoint.
    Restore,
}

impl StartPath {
    pub fn as_str(self) -> &'static str {
        match self {
            StartPath::Cold => "cold",
            StartPath::Warm => "warm",
            StartPath::Restore => "restore",
        }
    }
}

/// Why an instance was destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TerminationReason {
    Requested,
    TtlExpired,
    Exited,
    OomKilled,
    SpawnFailed,
    Drained,
    Evicted,
    LostOnRestart,
    Shutdown,
    /// A warm instance whose fresh sandbox was handed to another instance's reset; its
    /// record then carried that instance's previous sandbox to destruction.
    Recycled,
}

impl TerminationReason {
    pub const ALL: [TerminationReason; 10] = [
        TerminationReason::Requested,
        TerminationReason::TtlExpired,
        TerminationReason::Exited,
        TerminationReason::OomKilled,
        TerminationReason::SpawnFailed,
        TerminationReason::Drained,
        TerminationReason::Evicted,
        TerminationReason::LostOnRestart,
        TerminationReason::Shutdown,
        TerminationReason::Recycled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Requested => "requested",
            TerminationReason::TtlExpired => "ttl-expired",
            TerminationReason::Exited => "exited",
            TerminationReason::OomKilled => "oom-killed",
            TerminationReason::SpawnFailed => "spawn-failed",
            TerminationReason::Drained => "drained",
            TerminationReason::Evicted => "evicted",
            TerminationReason::LostOnRestart => "lost-on-restart",
            TerminationReason::Shutdown => "shutdown",
            TerminationReason::Recycled => "recycled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState::*;

    #[test]
    fn table_transitions_are_legal() {
        for (a, b) in [
            (Pending, Creating),
            (Creating, Running),
            (Creating, Warm),
            (Running, Paused),
            (Running, Reset),
            (Paused, Running),
            (Paused, Checkpointed),
            (Checkpointed, Running),
            (Reset, Warm),
            (Reset, Running),
            (Warm, Creating),
        ] {
            assert!(a.can_transition_to(b), "{a} -> {b}");
        }
    }

    #[test]
    fn everything_but_destroyed_can_be_destroyed() {
        for s in SandboxState::ALL {
            assert_eq!(s.can_transition_to(Destroyed), s != Destroyed, "{s}");
        }
    }

    #[test]
    fn illegal_transitions_are_rejected_with_names() {
        let e = Running.transition(Warm).unwrap_err();
        assert_eq!(e.to_string(), "illegal transition from `running` to `warm`");
        assert!(Destroyed.transition(Running).is_err());
        assert!(Warm.transition(Running).is_err());
        assert!(Pending.transition(Running).is_err());
    }

    #[test]
    fn exactly_the_table_is_legal() {
        let mut legal = 0;
        for a in SandboxState::ALL {
            for b in SandboxState::ALL {
                if a.can_transition_to(b) {
                    legal += 1;
                }
            }
        }
        // 11 table rows + 7 "-> destroyed"
        assert_eq!(legal, 18);
    }

    #[test]
    fn wire_names_round_trip() {
        for s in SandboxState::ALL {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(j, format!("\"{}\"", s.as_str()));
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
        }
        for r in TerminationReason::ALL {
            let j = serde_json::to_string(&r).unwrap();
            assert_eq!(j, format!("\"{}\"", r.as_str()));
        }
    }
}
