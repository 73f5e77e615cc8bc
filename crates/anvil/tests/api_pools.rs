//! Warm pools with the mock backend: pre-warm to target, warm claims and refill, sizing
//! (evicting above max), drain, reset back into the pool, refill backoff.
mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn pooled_opts() -> Opts {
    let mut o = Opts::default();
    o.policies
        .push(("pooled.toml".into(), MOCK_POOL_POLICY.into()));
    o
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn prewarm_claim_refill_sizing_drain_and_return() {
    let d = Daemon::start(pooled_opts());
    d.wait_for("3 warm", WAIT, || d.warm_count("mock", "mock-pooled") == 3);
    let st = d.pool_stats("mock", "mock-pooled").unwrap();
    assert_eq!(st["target"], 3);
    let warm = sorted(d.ids("state=warm"));
    assert_eq!(warm.len(), 3, "the instance list agrees: {warm:?}");
    for id in &warm {
        let i = d.instance(id);
        assert_eq!(i["workload_class"], "mock-pooled");
        assert_eq!(i["pool"]["backend"], "mock");
        assert!(
            d.state_dir()
                .join("instances")
                .join(id)
                .join("mock/state.json")
                .is_file(),
            "warm sandbox is real"
        );
    }
    // Never above target while idle.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.ids("state=warm").len(), 3);

    // A create takes a warm one, and the pool refills.
    let r = d.post(
        "/v1/instances",
        json!({"workload_class": "mock-pooled", "labels": {"who": "me"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let c = r.json();
    assert_eq!(c["start_path"], "warm");
    assert_eq!(c["instance"]["start_path"], "warm");
    assert_eq!(c["instance"]["state"], "running");
    assert_eq!(c["instance"]["labels"]["who"], "me");
    assert_eq!(c["decision"]["policy"], "mock-pooled");
    let claimed = c["instance"]["id"].as_str().unwrap().to_string();
    assert!(
        warm.contains(&claimed),
        "the claimed instance was one of the warm ones"
    );
    d.wait_for("refill to 3", WAIT, || {
        d.warm_count("mock", "mock-pooled") == 3 && d.ids("state=warm").len() == 3
    });
    assert!(!d.ids("state=warm").contains(&claimed));
    let st = d.pool_stats("mock", "mock-pooled").unwrap();
    assert_eq!(st["total_hits"], 1);
    // The claimed instance works like any other.
    assert_eq!(
        d.put(
            &format!("/v1/instances/{claimed}/files?path=/f"),
            b"x".to_vec()
        )
        .status,
        200
    );

    // Reset with return_to_pool: it is warm again, clean, and counted in the pool.
    let r = d.post(
        &format!("/v1/instances/{claimed}/reset"),
        json!({"return_to_pool": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["returned_to_pool"], true);
    let i = d.instance(&claimed);
    assert_eq!(i["state"], "warm");
    assert!(
        i["labels"].as_object().unwrap().is_empty(),
        "labels of the last user are cleared: {i}"
    );
    assert_eq!(
        d.warm_count("mock", "mock-pooled"),
        4,
        "3 + returned one (max 5)"
    );
    assert!(
        !d.state_dir()
            .join("instances")
            .join(&claimed)
            .join("mock/fs/f")
            .exists(),
        "reset wiped it"
    );
    // The next create may get it back, with no trace of the previous user.
    let again = d
        .post("/v1/instances", json!({"workload_class": "mock-pooled"}))
        .json();
    assert_eq!(again["start_path"], "warm");

    // Sizing: target 1, max 1 -> the excess is evicted, never above max.
    let before = d.ids("state=warm");
    let r = d.json_req(
        "PUT",
        "/v1/pools/mock/mock-pooled/sizing",
        json!({"min": 0, "target": 1, "max": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()[0]["stats"]["target"], 1);
    assert!(
        r.json()[0]["stats"]["warm_count"].as_u64().unwrap() <= 1,
        "{}",
        r.text()
    );
    d.wait_for("evicted to 1 warm", WAIT, || d.ids("state=warm").len() == 1);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(600) {
        assert!(d.warm_count("mock", "mock-pooled") <= 1, "above max");
        assert!(d.ids("state=warm").len() <= 1, "above max");
        std::thread::sleep(Duration::from_millis(50));
    }
    let evicted: Vec<_> = before
        .iter()
        .filter(|id| d.state_of(id) == "destroyed")
        .cloned()
        .collect();
    assert!(evicted.len() >= 2, "{evicted:?}");
    for id in &evicted {
        assert_eq!(d.instance(id)["termination_reason"], "evicted");
        assert!(!d.state_dir().join("instances").join(id).exists());
    }
    assert!(
        d.pool_stats("mock", "mock-pooled").unwrap()["evict_count"]
            .as_u64()
            .unwrap()
            >= 2
    );

    // Drain: destroys the warm ones and stops refilling.
    let warm_now = sorted(d.ids("state=warm"));
    let r = d.post("/v1/pools/mock/mock-pooled/drain", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let dr = r.json();
    let drained = sorted(
        dr["drained"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect(),
    );
    assert_eq!(drained, warm_now);
    assert_eq!(dr["count"], drained.len());
    for id in &drained {
        let i = d.instance(id);
        assert_eq!(i["state"], "destroyed");
        assert_eq!(i["termination_reason"], "drained");
        assert!(
            !d.state_dir().join("instances").join(id).exists(),
            "drained sandbox dir gone"
        );
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        d.warm_count("mock", "mock-pooled"),
        0,
        "no refill after drain"
    );
    assert!(d.ids("state=warm").is_empty(), "no refill after drain");
    // A create still works (cold) while drained.
    let r = d.post("/v1/instances", json!({"workload_class": "mock-pooled"}));
    assert_eq!(r.json()["start_path"], "cold");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        d.ids("state=warm").is_empty(),
        "a miss does not refill a drained pool"
    );

    // Sizing again resumes refills.
    let r = d.json_req(
        "PUT",
        "/v1/pools/mock/mock-pooled/sizing",
        json!({"min": 1, "target": 2, "max": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    d.wait_for("refill to 2 after sizing", WAIT, || {
        d.ids("state=warm").len() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.ids("state=warm").len(), 2);
    assert_eq!(d.warm_count("mock", "mock-pooled"), 2);
}

#[test]
fn refill_failures_back_off() {
    let d = Daemon::start(Opts::default());
    // A template whose stored rootfs then disappears: every refill fails.
    let src = d.dir.path().join("rootfs-src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/os-release"), "x").unwrap();
    let t = d.post("/v1/templates", json!({"name": "brk", "rootfs_dir": src}));
    assert_eq!(t.status, 201, "{}", t.text());
    let tid = t.json()["id"].as_str().unwrap().to_string();
    let stored = d.state_dir().join("templates").join(&tid).join("rootfs");
    assert!(stored.is_dir());
    std::fs::remove_dir_all(&stored).unwrap();
    let policy = r#"
manifest_version = 1
policy_name = "broken-pool"
priority = 30
[match]
workload_class = ["broken-pooled"]
[select]
backend_priority = ["mock"]
templates = ["brk"]
[pool]
enabled = true
min = 1
target = 2
max = 2
reset_mode = "overlayfs-rollback"
"#;
    std::fs::write(d.dir.path().join("policies/broken.toml"), policy).unwrap();
    let r = d.post("/v1/admin/reload", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let t0 = Instant::now();
    d.wait_for("refill failures", WAIT, || {
        d.pool_stats("mock", "broken-pooled")
            .is_some_and(|s| s["refill_failures"].as_u64().unwrap() >= 3)
    });
    // Keep watching for a few seconds: with backoff (500ms doubling after 3 failures) the count
    // grows slowly; without it (200ms interval, 2 at a time) it would be ~30+.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(t0.elapsed()));
    let st = d.pool_stats("mock", "broken-pooled").unwrap();
    let failures = st["refill_failures"].as_u64().unwrap();
    assert!(
        (3..=14).contains(&failures),
        "refill failures after ~4 s: {failures} ({st})"
    );
    assert_eq!(st["warm_count"], 0);
    assert!(d.ids("state=warm").is_empty());
    let m = d.get("/v1/metrics").text();
    assert!(
        m.contains(
            "anvil_pool_refill_failures_total{backend=\"mock\",workload_class=\"broken-pooled\"}"
        ),
        "{m}"
    );
    // Failed refills leave no sandbox directory behind.
    let left: Vec<_> = std::fs::read_dir(d.state_dir().join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "leftover instance dirs: {left:?}");
    // A create for that class fails cleanly (503 spawn_failed), not 500.
    let r = d.post("/v1/instances", json!({"workload_class": "broken-pooled"}));
    expect_error(&r, 503, Some("spawn_failed"));
}

#[test]
fn pools_respect_max_instances() {
    let mut o = pooled_opts();
    o.daemon_extra = "max_instances = 2\n".into();
    let d = Daemon::start(o);
    // The pool wants 3 but the host allows 2 instances in all (warm ones included).
    d.wait_for("some warm", WAIT, || {
        d.warm_count("mock", "mock-pooled") >= 1
    });
    std::thread::sleep(Duration::from_millis(1500));
    let live = d.ids("").len();
    assert!(
        live <= 2,
        "{live} live instances with max_instances = 2: {:?}",
        d.ids("")
    );
}
