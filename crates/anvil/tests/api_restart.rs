//! Acceptance 3: with the mock backend, `kill -9` the daemon and start it again: the same
//! instances come back in the same states, pools refill to target, and an instance whose
//! sandbox vanished while the daemon was down is destroyed with `lost-on-restart`.
mod common;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn states(d: &Daemon) -> BTreeMap<String, serde_json::Value> {
    let r = d.get("/v1/instances");
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap().to_string(), i.clone()))
        .collect()
}

#[test]
fn kill9_and_restart_keeps_instances_and_refills_pools() {
    let mut o = Opts::default();
    o.policies
        .push(("pooled.toml".into(), MOCK_POOL_POLICY.into()));
    let mut d = Daemon::start(o);
    d.wait_for("3 warm", WAIT, || d.warm_count("mock", "mock-pooled") == 3);

    let running = d.create(
        json!({"workload_class": "mock-class", "labels": {"role": "running"}, "ttl_secs": 3600}),
    );
    d.put(
        &format!("/v1/instances/{running}/files?path=/data.txt"),
        b"kept across restart".to_vec(),
    );
    let paused = d.create(json!({"workload_class": "mock-class"}));
    assert_eq!(
        d.post(&format!("/v1/instances/{paused}/pause"), json!({}))
            .status,
        200
    );
    let hib = d.create(json!({"workload_class": "mock-class"}));
    d.put(
        &format!("/v1/instances/{hib}/files?path=/h.txt"),
        b"hibernated".to_vec(),
    );
    let ck = d
        .post(
            &format!("/v1/instances/{hib}/checkpoint"),
            json!({"stop": true}),
        )
        .json()["checkpoint_id"]
        .as_str()
        .unwrap()
        .to_string();
    let claimed = d
        .post(
            "/v1/instances",
            json!({"workload_class": "mock-pooled", "id": "claimed-1"}),
        )
        .json();
    assert_eq!(claimed["start_path"], "warm");
    let lost = d.create(json!({"workload_class": "mock-class"}));
    let gone = d.create(json!({"workload_class": "mock-class"}));
    d.delete(&format!("/v1/instances/{gone}"));
    d.wait_for("refill to 3", WAIT, || {
        d.ids("state=warm").len() == 3 && d.warm_count("mock", "mock-pooled") == 3
    });
    let warm = d.ids("state=warm");

    let before = states(&d);
    assert_eq!(before[&running]["state"], "running");
    assert_eq!(before[&paused]["state"], "paused");
    assert_eq!(before[&hib]["state"], "checkpointed");
    assert_eq!(before["claimed-1"]["state"], "running");

    d.kill9();
    // While the daemon is down, one sandbox disappears and one warm sandbox too.
    std::fs::remove_dir_all(d.state_dir().join("instances").join(&lost)).unwrap();
    let lost_warm = warm[0].clone();
    std::fs::remove_dir_all(d.state_dir().join("instances").join(&lost_warm)).unwrap();
    d.spawn();

    let after = states(&d);
    for (id, was) in &before {
        if *id == lost || *id == lost_warm {
            continue;
        }
        let now = after
            .get(id)
            .unwrap_or_else(|| panic!("{id} missing after restart: {after:?}"));
        // The whole record is as before: id, state, labels, start path, TTL, pool.
        assert_eq!(now, was, "instance {id} changed across restart");
    }
    for id in [&lost, &lost_warm] {
        let i = d.instance(id);
        assert_eq!(i["state"], "destroyed", "{i}");
        assert_eq!(i["termination_reason"], "lost-on-restart", "{i}");
    }
    assert_eq!(
        d.instance(&gone)["termination_reason"],
        "requested",
        "tombstones survive too"
    );

    // The adopted instances still work.
    assert_eq!(
        d.get(&format!("/v1/instances/{running}/files?path=/data.txt"))
            .body,
        b"kept across restart"
    );
    assert_eq!(
        d.post(&format!("/v1/instances/{paused}/resume"), json!({}))
            .status,
        200
    );
    assert_eq!(d.state_of(&paused), "running");
    let r = d.post(&format!("/v1/instances/{hib}/resume"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        d.get(&format!("/v1/instances/{hib}/files?path=/h.txt"))
            .body,
        b"hibernated"
    );
    let cks = d.get(&format!("/v1/instances/{hib}/checkpoints")).json();
    assert_eq!(cks[0]["checkpoint_id"], ck.as_str(), "checkpoints survive");
    // Idempotent create still recognises the client id.
    let again = d.post(
        "/v1/instances",
        json!({"workload_class": "mock-pooled", "id": "claimed-1"}),
    );
    assert_eq!(again.status, 200, "{}", again.text());

    // The pool refills to target (the lost warm one is replaced), and the surviving warm ones
    // are claimable.
    d.wait_for("pool back to 3", WAIT, || {
        d.warm_count("mock", "mock-pooled") == 3 && d.ids("state=warm").len() == 3
    });
    let r = d.post("/v1/instances", json!({"workload_class": "mock-pooled"}));
    assert_eq!(r.json()["start_path"], "warm");
    d.wait_for("refill after claim", WAIT, || {
        d.ids("state=warm").len() == 3
    });

    // The reaper still knows the TTL of adopted instances.
    assert_eq!(
        d.post(
            &format!("/v1/instances/{running}/ttl"),
            json!({"ttl_secs": 1})
        )
        .status,
        200
    );
    d.wait_for("ttl after restart", Duration::from_secs(4), || {
        d.state_of(&running) == "destroyed"
    });
    assert_eq!(d.instance(&running)["termination_reason"], "ttl-expired");
}

#[test]
fn restart_twice_and_sigterm_keep_state() {
    let mut d = Daemon::start(Opts {
        daemon_extra: String::new(),
        ..Opts::default()
    });
    let a = d.create(json!({"workload_class": "mock-class"}));
    d.kill9();
    d.spawn();
    assert_eq!(d.state_of(&a), "running");
    d.kill9();
    d.spawn();
    assert_eq!(d.state_of(&a), "running");
    let b = d.create(json!({"workload_class": "mock-class"}));
    assert_ne!(a, b);
    assert_eq!(d.ids("").len(), 2);
    // The harness config says shutdown = "destroy": a SIGTERM destroys everything with reason
    // `shutdown`, and the next daemon sees that.
    let st = d.sigterm().unwrap();
    assert!(st.success(), "{st}");
    assert!(!d.socket.exists(), "socket removed on shutdown");
    d.spawn();
    for id in [&a, &b] {
        let i = d.instance(id);
        assert_eq!(i["state"], "destroyed");
        assert_eq!(i["termination_reason"], "shutdown");
    }
    let left: Vec<_> = std::fs::read_dir(d.state_dir().join("instances"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "no sandbox dirs left: {left:?}");
}
