//! Property tests of pool bookkeeping: random interleavings of refills (plan → start →
//! finish), claims, removals, sizing changes and time never plan beyond `max`, never hand out
//! an id twice or one that is not warm, and keep the counters consistent.
use anvil_core::pool::{PoolBook, PoolSizing};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    /// Run the refiller: plan, then start what it says.
    Plan,
    /// Finish the oldest in-flight creation.
    Finish(bool),
    Claim,
    /// Remove the n-th warm instance (it died).
    Remove(usize),
    /// A reset instance returns to the pool if there is room.
    Return,
    Resize(u32, u32, u32, bool),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Plan),
        4 => any::<bool>().prop_map(Op::Finish),
        3 => Just(Op::Claim),
        1 => (0usize..8).prop_map(Op::Remove),
        1 => Just(Op::Return),
        1 => (0u32..6, 0u32..6, 0u32..10, prop::bool::weighted(0.8))
            .prop_map(|(a, b, c, e)| Op::Resize(a, b, c, e)),
        2 => (0u64..120_000).prop_map(Op::Advance),
    ]
}

fn sizing(a: u32, b: u32, c: u32, enabled: bool) -> PoolSizing {
    let mut v = [a, b, c];
    v.sort();
    PoolSizing {
        min: v[0],
        target: v[1],
        max: v[2],
        enabled,
        image_digest: None,
        warm_ttl_secs: 60,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 500,
        // CI must not write regression files into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn pool_book_invariants(
        init in (0u32..6, 0u32..6, 0u32..10, any::<bool>()),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let mut book = PoolBook::new(
            sizing(init.0, init.1, init.2, init.3),
            Duration::from_millis(500),
            Duration::from_secs(8),
            3,
        );
        let mut now = 1_700_000_000_000u64;
        let mut next_id = 0u64;
        let mut in_flight = 0u32;
        let mut warm: BTreeSet<String> = BTreeSet::new();
        let mut handed_out: BTreeSet<String> = BTreeSet::new();
        let (mut claims, mut evicted_total) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Plan => {
                    let before = book.warm_count();
                    let plan = book.plan(now);
                    let s = book.sizing().clone();
                    for id in &plan.evict {
                        prop_assert!(warm.remove(id), "evicted {} that was not warm", id);
                    }
                    evicted_total += plan.evict.len() as u64;
                    prop_assert_eq!(book.warm_count() as usize, before as usize - plan.evict.len());
                    if !s.enabled {
                        prop_assert_eq!(book.warm_count(), 0);
                        prop_assert_eq!(plan.create, 0);
                    } else {
                        prop_assert!(book.warm_count() <= s.max, "warm {} > max {}", book.warm_count(), s.max);
                        // In-flight creations started under a larger `max` may exceed a
                        // lowered one; new ones are only planned into room below `max`.
                        prop_assert!(
                            plan.create == 0 || book.warm_count() + in_flight + plan.create <= s.max,
                            "plan to {} + {} + {} exceeds max {}", book.warm_count(), in_flight, plan.create, s.max
                        );
                    }
                    prop_assert!(plan.urgent <= plan.create);
                    if book.backoff_until(now).is_some() {
                        prop_assert_eq!(plan.create, 0, "creates planned during backoff");
                    }
                    for _ in 0..plan.create {
                        book.creation_started();
                        in_flight += 1;
                    }
                }
                Op::Finish(ok) => {
                    if in_flight > 0 {
                        in_flight -= 1;
                        book.creation_finished(ok, now);
                        if ok {
                            let id = format!("w{next_id}");
                            next_id += 1;
                            prop_assert!(book.add_warm(id.clone(), now));
                            prop_assert!(!book.add_warm(id.clone(), now), "duplicate add accepted");
                            warm.insert(id);
                        }
                    }
                }
                Op::Claim => {
                    claims += 1;
                    match book.claim() {
                        Some(id) => {
                            prop_assert!(warm.remove(&id), "claimed {} that was not warm", id);
                            prop_assert!(handed_out.insert(id.clone()), "{} handed out twice", id);
                        }
                        None => prop_assert!(warm.is_empty(), "miss with warm instances"),
                    }
                }
                Op::Remove(n) => {
                    if let Some(id) = warm.iter().nth(n).cloned() {
                        prop_assert!(book.remove(&id));
                        prop_assert!(!book.remove(&id));
                        warm.remove(&id);
                    }
                }
                Op::Return => {
                    if book.has_room() {
                        let id = format!("r{next_id}");
                        next_id += 1;
                        prop_assert!(book.add_warm(id.clone(), now));
                        warm.insert(id);
                        prop_assert!(book.warm_count() + in_flight <= book.sizing().max);
                    }
                }
                Op::Resize(a, b, c, e) => book.set_sizing(sizing(a, b, c, e)),
                Op::Advance(ms) => now += ms,
            }
            prop_assert_eq!(book.in_flight(), in_flight);
            let ids: BTreeSet<String> = book.warm_ids().into_iter().collect();
            prop_assert_eq!(&ids, &warm);
            prop_assert_eq!(book.warm_count() as usize, warm.len());
            let st = book.stats();
            prop_assert_eq!(st.total_hits + st.total_misses, claims);
            prop_assert_eq!(st.evict_count, evicted_total);
        }
    }
}
