//! Prometheus metrics (SPEC §11), prefix `anvil_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendPathLabels {
    pub backend: String,
    pub start_path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub backend: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub backend: String,
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub backend: String,
    pub workload_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
    pub backend: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    pub requests_total: Family<RouteLabels, Counter>,
    pub http_request_duration: HistFamily<RouteLabels>,
    pub instances_created_total: Family<BackendPathLabels, Counter>,
    pub instances_destroyed_total: Family<ReasonLabels, Counter>,
    pub instances_resets_total: Family<ModeLabels, Counter>,
    pub pool_hits_total: Family<PoolLabels, Counter>,
    pub pool_misses_total: Family<PoolLabels, Counter>,
    pub pool_refill_failures_total: Family<PoolLabels, Counter>,
    pub policy_eval_failures_total: Counter,
    pub create_duration: HistFamily<BackendPathLabels>,
    pub exec_duration: HistFamily<BackendLabels>,
    pub reset_duration: HistFamily<ModeLabels>,
    pub checkpoint_duration: HistFamily<BackendLabels>,
    pub restore_duration: HistFamily<BackendLabels>,
    pub instances: Family<StateLabels, Gauge>,
    pub pool_warm: Family<PoolLabels, Gauge>,
    pub pool_target: Family<PoolLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("anvil");
        let m = Metrics {
            requests_total: Family::default(),
            http_request_duration: Family::new_with_constructor(latency_histogram),
            instances_created_total: Family::default(),
            instances_destroyed_total: Family::default(),
            instances_resets_total: Family::default(),
            pool_hits_total: Family::default(),
            pool_misses_total: Family::default(),
            pool_refill_failures_total: Family::default(),
            policy_eval_failures_total: Counter::default(),
            create_duration: Family::new_with_constructor(latency_histogram),
            exec_duration: Family::new_with_constructor(latency_histogram),
            reset_duration: Family::new_with_constructor(latency_histogram),
            checkpoint_duration: Family::new_with_constructor(latency_histogram),
            restore_duration: Family::new_with_constructor(latency_histogram),
            instances: Family::default(),
            pool_warm: Family::default(),
            pool_target: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "HTTP requests by method, route and status",
            m.requests_total.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            m.http_request_duration.clone(),
        );
        registry.register(
            "instances_created",
            "Instances created, by backend and start path",
            m.instances_created_total.clone(),
        );
        registry.register(
            "instances_destroyed",
            "Instances destroyed (terminations), by backend and reason",
            m.instances_destroyed_total.clone(),
        );
        registry.register(
            "instances_resets",
            "Instance resets, by backend and mode",
            m.instances_resets_total.clone(),
        );
        registry.register(
            "pool_hits",
            "Creates served from a warm pool",
            m.pool_hits_total.clone(),
        );
        registry.register(
            "pool_misses",
            "Creates that found no warm instance",
            m.pool_misses_total.clone(),
        );
        registry.register(
            "pool_refill_failures",
            "Failed pool refills",
            m.pool_refill_failures_total.clone(),
        );
        registry.register(
            "policy_eval_failures",
            "Create requests no policy accepted",
            m.policy_eval_failures_total.clone(),
        );
        registry.register(
            "create_duration_seconds",
            "Create latency, by backend and start path",
            m.create_duration.clone(),
        );
        registry.register(
            "exec_duration_seconds",
            "Exec latency, by backend",
            m.exec_duration.clone(),
        );
        registry.register(
            "reset_duration_seconds",
            "Reset latency, by backend and mode",
            m.reset_duration.clone(),
        );
        registry.register(
            "checkpoint_duration_seconds",
            "Checkpoint latency, by backend",
            m.checkpoint_duration.clone(),
        );
        registry.register(
            "restore_duration_seconds",
            "Restore (fork, rollback, hibernation resume) latency, by backend",
            m.restore_duration.clone(),
        );
        registry.register(
            "instances",
            "Live instances by state and backend",
            m.instances.clone(),
        );
        registry.register("pool_warm", "Warm instances per pool", m.pool_warm.clone());
        registry.register(
            "pool_target",
            "Target warm instances per pool",
            m.pool_target.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_counters_are_exposed_with_prefix() {
        let m = Metrics::new();
        m.policy_eval_failures_total.inc();
        m.pool_hits_total
            .get_or_create(&PoolLabels {
                backend: "mock".into(),
                workload_class: "x".into(),
            })
            .inc();
        let text = m.encode();
        for name in [
            "anvil_policy_eval_failures_total 1",
            "anvil_pool_hits_total{backend=\"mock\",workload_class=\"x\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
