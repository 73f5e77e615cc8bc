//! Property tests of the lifecycle state machine (SPEC §3): random operation sequences never
//! leave the table, illegal transitions change nothing and name both states, `destroyed` is
//! final, and every state is reachable from `pending`.
use anvil_core::lifecycle::SandboxState::{self, *};
use proptest::prelude::*;
use std::collections::BTreeSet;

/// SPEC §3, written out independently of the implementation.
fn spec_allows(from: SandboxState, to: SandboxState) -> bool {
    const TABLE: &[(SandboxState, SandboxState)] = &[
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
    ];
    (to == Destroyed && from != Destroyed) || TABLE.contains(&(from, to))
}

fn state() -> impl Strategy<Value = SandboxState> {
    prop::sample::select(SandboxState::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        // CI must not write regression files into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn transitions_match_the_spec_table(from in state(), to in state()) {
        prop_assert_eq!(from.can_transition_to(to), spec_allows(from, to));
        match from.transition(to) {
            Ok(s) => prop_assert_eq!(s, to),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains(from.as_str()) && msg.contains(to.as_str()), "{}", msg);
            }
        }
    }

    #[test]
    fn random_sequences_stay_legal(ops in prop::collection::vec(state(), 0..200)) {
        let mut cur = Pending;
        let mut destroyed = false;
        for to in ops {
            match cur.transition(to) {
                Ok(next) => {
                    prop_assert!(spec_allows(cur, next));
                    prop_assert!(!destroyed, "left destroyed for {}", next);
                    cur = next;
                }
                Err(_) => prop_assert!(!spec_allows(cur, to)),
            }
            destroyed |= cur == Destroyed;
            prop_assert!(SandboxState::ALL.contains(&cur));
            prop_assert_eq!(cur.is_terminal(), cur == Destroyed);
        }
    }

    #[test]
    fn wire_names_round_trip(s in state()) {
        prop_assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(json, format!("\"{}\"", s.as_str()));
    }
}

#[test]
fn every_state_is_reachable_from_pending_and_can_be_destroyed() {
    let mut seen = BTreeSet::from([Pending]);
    let mut frontier = vec![Pending];
    while let Some(s) = frontier.pop() {
        for to in SandboxState::ALL {
            if s.can_transition_to(to) && seen.insert(to) {
                frontier.push(to);
            }
        }
    }
    assert_eq!(seen.len(), SandboxState::ALL.len(), "reachable: {seen:?}");
    for s in SandboxState::ALL {
        assert_eq!(
            s.can_transition_to(Destroyed),
            s != Destroyed,
            "{s} -> destroyed"
        );
    }
}
