//! Warm-pool bookkeeping (SPEC §4 pools, §6 `[pool]`). Pure: the daemon passes the time in and
//! carries out the plan (creates, destroys); this module decides how many and which.
//!
//! Times are milliseconds since the Unix epoch (`u64`), so warm-since stamps survive a daemon
//! restart through the store.
//!
//! Rules: a pool pre-warms to `target` counting creations in flight, never holds more than
//! `max`, and replaces warm instances older than `warm_ttl`. `min` is the floor: expired
//! instances that keep the pool at `min` stay claimable until their replacements are warm
//! (make before break, when `max` leaves room), and `PoolPlan::urgent` says how many creations
//! are needed to get back to `min`. After `failure_threshold` consecutive failed creations a
//! pool backs off exponentially (initial .. max) until one succeeds.

use crate::backend::BackendKind;
use crate::config::PoolSection;
use crate::policy::PolicyPool;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;
use utoipa::ToSchema;

/// Pools are per backend, workload class and image.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub struct PoolKey {
    pub backend: BackendKind,
    pub workload_class: String,
    pub image_digest: String,
}

/// Sizing of one pool (from its policy, or `PUT /v1/pools/{backend}/{class}/sizing`).
/// The default (all zero, disabled) is a pool that holds nothing: `plan` evicts everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct PoolSizing {
    pub min: u32,
    pub target: u32,
    pub max: u32,
    pub enabled: bool,
    /// Image the pool pre-warms; None = the policy's default template's digest.
    #[serde(default)]
    pub image_digest: Option<String>,
    pub warm_ttl_secs: u64,
}

impl PoolSizing {
    pub fn from_policy(p: &PolicyPool) -> PoolSizing {
        PoolSizing {
            min: p.min,
            target: p.target,
            max: p.max,
            enabled: p.enabled,
            image_digest: None,
            // Sub-second TTLs round up so that a configured TTL never becomes 0.
            warm_ttl_secs: p.warm_ttl.0.as_secs() + u64::from(p.warm_ttl.0.subsec_nanos() > 0),
        }
    }

    /// `min <= target <= max`, `warm_ttl_secs > 0`; errors name the fields and values.
    pub fn validate(&self) -> Result<(), String> {
        if self.min > self.target {
            return Err(format!(
                "min ({}) is greater than target ({})",
                self.min, self.target
            ));
        }
        if self.target > self.max {
            return Err(format!(
                "target ({}) is greater than max ({})",
                self.target, self.max
            ));
        }
        if self.warm_ttl_secs == 0 {
            return Err("warm_ttl_secs must be greater than 0".into());
        }
        if let Some(d) = &self.image_digest {
            if d.is_empty() {
                return Err("image_digest must not be empty when given".into());
            }
        }
        Ok(())
    }

    pub fn warm_ttl(&self) -> Duration {
        Duration::from_secs(self.warm_ttl_secs)
    }

    fn warm_ttl_ms(&self) -> u64 {
        self.warm_ttl_secs.saturating_mul(1000)
    }
}

/// Daemon-wide refill behaviour (`[pool]` of the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub failure_threshold: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl PoolSettings {
    pub fn from_config(c: &PoolSection) -> PoolSettings {
        PoolSettings {
            failure_threshold: c.failure_threshold.max(1),
            backoff_initial: c.backoff_initial.0,
            backoff_max: c.backoff_max.0.max(c.backoff_initial.0),
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings::from_config(&PoolSection::default())
    }
}

/// `GET /v1/pools` stats.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct PoolStats {
    pub warm_count: u32,
    pub target: u32,
    pub total_hits: u64,
    pub total_misses: u64,
    pub evict_count: u64,
    pub refill_failures: u64,
}

/// What the refiller should do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolPlan {
    /// New warm instances to start now (call `creation_started` for each).
    pub create: u32,
    /// How many of `create` are needed to get back to `min` (refill these first).
    pub urgent: u32,
    /// Warm instances to destroy (expired and not needed for the `min` floor, above `max`, or
    /// the pool is disabled). They are already removed from the book and cannot be claimed.
    pub evict: Vec<String>,
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Warm {
    id: String,
    since_ms: u64,
}

/// The state of one pool.
#[derive(Debug, Clone)]
pub struct PoolBook {
    sizing: PoolSizing,
    settings: PoolSettings,
    /// Oldest first.
    warm: VecDeque<Warm>,
    in_flight: u32,
    hits: u64,
    misses: u64,
    evicted: u64,
    refill_failures: u64,
    consecutive_failures: u32,
    backoff: Option<Duration>,
    backoff_until_ms: Option<u64>,
}

impl PoolBook {
    pub fn new(
        sizing: PoolSizing,
        backoff_initial: Duration,
        backoff_max: Duration,
        failure_threshold: u32,
    ) -> PoolBook {
        PoolBook::with_settings(
            sizing,
            PoolSettings {
                failure_threshold: failure_threshold.max(1),
                backoff_initial,
                backoff_max: backoff_max.max(backoff_initial),
            },
        )
    }

    pub fn with_settings(sizing: PoolSizing, settings: PoolSettings) -> PoolBook {
        PoolBook {
            sizing,
            settings,
            warm: VecDeque::new(),
            in_flight: 0,
            hits: 0,
            misses: 0,
            evicted: 0,
            refill_failures: 0,
            consecutive_failures: 0,
            backoff: None,
            backoff_until_ms: None,
        }
    }

    pub fn sizing(&self) -> &PoolSizing {
        &self.sizing
    }

    /// New sizing takes effect at the next `plan` (which evicts above a lowered `max`).
    pub fn set_sizing(&mut self, sizing: PoolSizing) {
        self.sizing = sizing;
    }

    pub fn set_settings(&mut self, settings: PoolSettings) {
        self.settings = settings;
    }

    /// Adds a warm instance (a finished creation, a reset instance returning to the pool, or
    /// one adopted after a restart with its original warm-since time). Always accepted so that
    /// nothing running goes untracked; the next `plan` evicts it if the pool is disabled or
    /// above `max`. Returns false only if the id is already here.
    pub fn add_warm(&mut self, id: impl Into<String>, now_ms: u64) -> bool {
        let id = id.into();
        if self.warm.iter().any(|w| w.id == id) {
            return false;
        }
        // Keep oldest-first order even for adopted instances with older stamps.
        let pos = self.warm.partition_point(|w| w.since_ms <= now_ms);
        self.warm.insert(
            pos,
            Warm {
                id,
                since_ms: now_ms,
            },
        );
        true
    }

    /// Whether another warm instance fits under `max` (checked before returning a reset
    /// instance to the pool). Creations in flight count: they become warm when they finish.
    pub fn has_room(&self) -> bool {
        self.sizing.enabled
            && self.warm.len() + (self.in_flight as usize) < self.sizing.max as usize
    }

    /// Takes the oldest warm instance (the one closest to its TTL). Counts a hit or a miss.
    pub fn claim(&mut self) -> Option<String> {
        match self.warm.pop_front() {
            Some(w) => {
                self.hits += 1;
                Some(w.id)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Takes the oldest warm instance for a reset (its fresh sandbox replaces a used one).
    /// A hit when there is one; an empty pool is not a miss: the reset then runs in place,
    /// nothing had to start cold.
    pub fn take_for_reset(&mut self) -> Option<String> {
        let w = self.warm.pop_front()?;
        self.hits += 1;
        Some(w.id)
    }

    /// Takes the oldest warm instance accepted by `pred` (e.g. one whose process is still
    /// alive), counting a hit or miss like `claim`.
    pub fn claim_where(&mut self, pred: &dyn Fn(&str) -> bool) -> Option<String> {
        match self.warm.iter().position(|w| pred(&w.id)) {
            Some(i) => {
                self.hits += 1;
                self.warm.remove(i).map(|w| w.id)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Forgets a warm instance (it died, or was destroyed by someone else). True if it was here.
    pub fn remove(&mut self, id: &str) -> bool {
        match self.warm.iter().position(|w| w.id == id) {
            Some(i) => {
                self.warm.remove(i);
                true
            }
            None => false,
        }
    }

    /// Removes and returns every warm instance (`POST .../drain`), oldest first.
    pub fn drain(&mut self) -> Vec<String> {
        self.warm.drain(..).map(|w| w.id).collect()
    }

    /// Same as [`PoolBook::drain`].
    pub fn take_all_warm(&mut self) -> Vec<String> {
        self.drain()
    }

    pub fn warm_ids(&self) -> Vec<String> {
        self.warm.iter().map(|w| w.id.clone()).collect()
    }

    pub fn warm_count(&self) -> u32 {
        clamp_u32(self.warm.len())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// When refills may start again (epoch ms), if the pool is backing off at `now_ms`.
    pub fn backoff_until(&self, now_ms: u64) -> Option<u64> {
        self.backoff_until_ms.filter(|t| *t > now_ms)
    }

    /// Evicts what must go and says how many to create.
    pub fn plan(&mut self, now_ms: u64) -> PoolPlan {
        let mut evict = Vec::new();
        if !self.sizing.enabled {
            evict.extend(self.warm.drain(..).map(|w| w.id));
            self.evicted += evict.len() as u64;
            return PoolPlan {
                create: 0,
                urgent: 0,
                evict,
            };
        }
        while self.warm.len() > self.sizing.max as usize {
            match self.warm.pop_front() {
                Some(w) => evict.push(w.id),
                None => break,
            }
        }
        // `warm` is oldest first, so the expired ones are a prefix.
        let ttl = self.sizing.warm_ttl_ms();
        let expired = self
            .warm
            .partition_point(|w| now_ms.saturating_sub(w.since_ms) >= ttl);
        let fresh = clamp_u32(self.warm.len() - expired);
        let have_fresh = fresh.saturating_add(self.in_flight);
        let need = self.sizing.target.saturating_sub(have_fresh);
        // Make before break for the floor: up to `min` expired instances stay claimable until
        // replacements are warm, if that leaves room under `max` for those replacements.
        let room = self
            .sizing
            .max
            .saturating_sub(have_fresh.saturating_add(need));
        let keep = self
            .sizing
            .min
            .saturating_sub(fresh)
            .min(clamp_u32(expired))
            .min(room) as usize;
        for _ in 0..expired - keep {
            if let Some(w) = self.warm.pop_front() {
                evict.push(w.id);
            }
        }
        self.evicted += evict.len() as u64;

        let cap = self
            .sizing
            .max
            .saturating_sub(self.warm_count().saturating_add(self.in_flight));
        let create = if self.backoff_until(now_ms).is_some() {
            0
        } else {
            need.min(cap)
        };
        let urgent = self.sizing.min.saturating_sub(have_fresh).min(create);
        PoolPlan {
            create,
            urgent,
            evict,
        }
    }

    /// A planned creation has started.
    pub fn creation_started(&mut self) {
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// A creation has ended. Success resets the failure streak and backoff (then call
    /// `add_warm`); failure counts, and from `failure_threshold` consecutive failures on sets a
    /// backoff that doubles from `backoff_initial` up to `backoff_max`.
    pub fn creation_finished(&mut self, ok: bool, now_ms: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if ok {
            self.consecutive_failures = 0;
            self.backoff = None;
            self.backoff_until_ms = None;
            return;
        }
        self.refill_failures += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= self.settings.failure_threshold {
            let next = match self.backoff {
                None => self.settings.backoff_initial,
                Some(b) => b.saturating_mul(2).min(self.settings.backoff_max),
            };
            self.backoff = Some(next);
            let next_ms = u64::try_from(next.as_millis()).unwrap_or(u64::MAX);
            self.backoff_until_ms = Some(now_ms.saturating_add(next_ms));
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            warm_count: self.warm_count(),
            target: self.sizing.target,
            total_hits: self.hits,
            total_misses: self.misses,
            evict_count: self.evicted,
            refill_failures: self.refill_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn sizing(min: u32, target: u32, max: u32, ttl: u64) -> PoolSizing {
        PoolSizing {
            min,
            target,
            max,
            enabled: true,
            image_digest: None,
            warm_ttl_secs: ttl,
        }
    }

    fn book(s: PoolSizing) -> PoolBook {
        PoolBook::new(s, Duration::from_millis(500), Duration::from_secs(4), 3)
    }

    #[test]
    fn sizing_validation_names_values() {
        assert!(sizing(0, 0, 0, 1).validate().is_ok());
        assert!(sizing(2, 4, 16, 600).validate().is_ok());
        let e = sizing(3, 2, 5, 1).validate().unwrap_err();
        assert!(e.contains("min (3)") && e.contains("target (2)"), "{e}");
        let e = sizing(1, 6, 5, 1).validate().unwrap_err();
        assert!(e.contains("target (6)") && e.contains("max (5)"), "{e}");
        assert!(sizing(0, 1, 1, 0).validate().is_err());
        let p = PolicyPool {
            enabled: true,
            min: 1,
            target: 2,
            max: 3,
            warm_ttl: crate::quantity::DurationValue::millis(1500),
            reset_mode: crate::backend::ResetMode::FullRecreate,
        };
        let s = PoolSizing::from_policy(&p);
        assert_eq!((s.min, s.target, s.max, s.warm_ttl_secs), (1, 2, 3, 2));
        let d = PoolSettings::from_config(&PoolSection::default());
        assert_eq!(d.failure_threshold, 3);
        assert_eq!(d.backoff_initial, Duration::from_millis(500));
    }

    #[test]
    fn fills_to_target_counting_in_flight() {
        let mut b = book(sizing(1, 3, 5, 60));
        let p = b.plan(T0);
        assert_eq!((p.create, p.urgent), (3, 1));
        for _ in 0..p.create {
            b.creation_started();
        }
        // Nothing more while those are in flight.
        assert_eq!(b.plan(T0).create, 0);
        b.creation_finished(true, T0);
        assert!(b.add_warm("a", T0));
        assert_eq!(b.plan(T0).create, 0);
        assert_eq!(b.in_flight(), 2);
        assert_eq!(b.claim().as_deref(), Some("a"));
        assert_eq!(b.plan(T0).create, 1);
    }

    #[test]
    fn claim_is_oldest_first_and_counts() {
        let mut b = book(sizing(0, 3, 3, 60));
        assert!(b.add_warm("mid", T0 + 1000));
        assert!(!b.add_warm("mid", T0 + 1000), "duplicate");
        assert!(b.add_warm("new", T0 + 2000));
        // Adopted after a restart with an older stamp: still oldest first.
        assert!(b.add_warm("old", T0));
        assert_eq!(b.warm_ids(), vec!["old", "mid", "new"]);
        assert!(!b.has_room());
        assert_eq!(b.claim().as_deref(), Some("old"));
        assert!(b.has_room());
        assert_eq!(b.claim_where(&|id| id == "new").as_deref(), Some("new"));
        assert_eq!(b.claim_where(&|_| false), None);
        assert!(b.remove("mid"));
        assert!(!b.remove("mid"));
        assert_eq!(b.claim(), None);
        let s = b.stats();
        assert_eq!(
            (s.total_hits, s.total_misses, s.warm_count, s.target),
            (2, 2, 0, 3)
        );
    }

    #[test]
    fn evicts_expired_and_above_max() {
        let mut b = book(sizing(0, 4, 4, 10));
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            assert!(b.add_warm(*id, T0 + 1000 * i as u64));
        }
        let p = b.plan(T0 + 11_000);
        assert_eq!(p.evict, vec!["a", "b"]);
        assert_eq!(p.create, 2, "expired ones are replaced");
        assert_eq!(b.warm_ids(), vec!["c", "d"]);
        // Lowering max evicts the oldest extras.
        b.set_sizing(sizing(0, 1, 1, 10));
        let p = b.plan(T0 + 11_000);
        assert_eq!(p.evict, vec!["c"]);
        assert_eq!(p.create, 0);
        assert_eq!(b.stats().evict_count, 3);
        // Above max through add_warm: accepted, then evicted by the next plan.
        assert!(b.add_warm("e", T0 + 11_000));
        assert_eq!(b.plan(T0 + 11_000).evict, vec!["d"]);
        // Disabling (or the default sizing) evicts everything and plans nothing.
        b.set_sizing(PoolSizing::default());
        let p = b.plan(T0 + 11_000);
        assert_eq!((p.evict.clone(), p.create), (vec!["e".to_string()], 0));
        assert!(!b.has_room());
    }

    #[test]
    fn min_floor_is_make_before_break() {
        let mut b = book(sizing(2, 3, 5, 10));
        for id in ["a", "b", "c"] {
            b.add_warm(id, T0);
        }
        let now = T0 + 11_000;
        let p = b.plan(now);
        assert_eq!(p.evict, vec!["a"], "two expired stay to hold min");
        assert_eq!((p.create, p.urgent), (3, 2));
        for _ in 0..3 {
            b.creation_started();
        }
        let p = b.plan(now);
        assert!(p.evict.is_empty() && p.create == 0);
        // Kept instances are still claimable, oldest first.
        assert_eq!(b.warm_ids(), vec!["b", "c"]);
        b.creation_finished(true, now);
        b.add_warm("x", now);
        assert_eq!(b.plan(now).evict, vec!["b"]);
        b.creation_finished(true, now);
        b.add_warm("y", now);
        assert_eq!(b.plan(now).evict, vec!["c"]);
        b.creation_finished(true, now);
        b.add_warm("z", now);
        let p = b.plan(now);
        assert!(p.evict.is_empty() && p.create == 0);
        assert_eq!(b.warm_ids(), vec!["x", "y", "z"]);
        assert_eq!(b.stats().evict_count, 3);
    }

    #[test]
    fn min_floor_yields_when_max_leaves_no_room() {
        let mut b = book(sizing(2, 2, 2, 10));
        b.add_warm("a", T0);
        b.add_warm("b", T0);
        let p = b.plan(T0 + 10_000);
        assert_eq!(p.evict, vec!["a", "b"]);
        assert_eq!(p.create, 2);
    }

    #[test]
    fn backoff_after_threshold_doubles_to_max_and_resets() {
        let mut b = book(sizing(0, 2, 2, 60));
        let fail = |b: &mut PoolBook, at: u64| {
            b.creation_started();
            b.creation_finished(false, at);
        };
        fail(&mut b, T0);
        fail(&mut b, T0);
        assert!(b.backoff_until(T0).is_none(), "below threshold");
        assert_eq!(b.plan(T0).create, 2);
        fail(&mut b, T0);
        assert_eq!(b.backoff_until(T0), Some(T0 + 500));
        assert_eq!(b.plan(T0).create, 0);
        assert_eq!(b.plan(T0 + 500).create, 2);
        let mut at = T0 + 500;
        let mut seen = Vec::new();
        for _ in 0..5 {
            fail(&mut b, at);
            let until = b.backoff_until(at).unwrap();
            seen.push(until - at);
            at = until;
        }
        assert_eq!(seen, [1000, 2000, 4000, 4000, 4000]);
        assert_eq!(b.stats().refill_failures, 8);
        b.creation_started();
        b.creation_finished(true, at);
        assert_eq!(b.consecutive_failures(), 0);
        assert!(b.backoff_until(at).is_none());
        // After a success, the threshold applies again from scratch.
        fail(&mut b, at);
        assert!(b.backoff_until(at).is_none());
    }

    /// Deterministic pseudo-random walk over the book's operations, checking the invariants
    /// after every step.
    #[test]
    fn invariants_hold_under_random_operations() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let max = rnd(8) as u32;
            let target = rnd(u64::from(max) + 1) as u32;
            let min = rnd(u64::from(target) + 1) as u32;
            let ttl = 1 + rnd(20);
            let mut b = book(sizing(min, target, max, ttl));
            let mut now = T0;
            let mut next_id = 0u32;
            let mut warm_since: std::collections::HashMap<String, u64> = Default::default();
            for _ in 0..300 {
                now += rnd(3000);
                match rnd(6) {
                    0 | 1 => {
                        let p = b.plan(now);
                        for id in &p.evict {
                            assert!(warm_since.remove(id).is_some(), "evicted unknown {id}");
                        }
                        let have = b.warm_count() + b.in_flight();
                        assert!(have + p.create <= max, "round {round}: exceeds max");
                        let expired = b
                            .warm_ids()
                            .iter()
                            .filter(|id| now - warm_since[*id] >= ttl * 1000)
                            .count() as u32;
                        let fresh = b.warm_count() - expired;
                        let have_fresh = fresh + b.in_flight();
                        assert!(
                            have_fresh + p.create <= target.max(have_fresh),
                            "round {round}: exceeds target"
                        );
                        // Expired instances stay only to hold the floor.
                        assert!(
                            expired <= min.saturating_sub(fresh),
                            "round {round}: expired kept above min"
                        );
                        assert!(p.urgent <= p.create);
                        assert!(b.warm_count() <= max, "round {round}: warm above max");
                        for _ in 0..p.create {
                            b.creation_started();
                        }
                    }
                    2 if b.in_flight() > 0 => {
                        let ok = rnd(3) != 0;
                        b.creation_finished(ok, now);
                        if ok {
                            next_id += 1;
                            let id = format!("i{next_id}");
                            assert!(b.add_warm(id.clone(), now));
                            warm_since.insert(id, now);
                        }
                    }
                    3 => {
                        if let Some(id) = b.claim() {
                            assert!(warm_since.remove(&id).is_some());
                        }
                    }
                    4 => {
                        if let Some(id) = b.warm_ids().first().cloned() {
                            assert!(b.remove(&id));
                            warm_since.remove(&id);
                        }
                    }
                    _ => {}
                }
                // In-flight creations reserve room, so landing them never overfills.
                assert!(
                    b.warm_count() + b.in_flight() <= max.max(b.warm_count()),
                    "round {round}"
                );
                assert!(b.warm_count() <= max, "round {round}: warm above max");
                assert_eq!(b.warm_count() as usize, warm_since.len());
            }
        }
    }
}
