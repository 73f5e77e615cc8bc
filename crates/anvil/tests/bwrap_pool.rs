//! bubblewrap on the real daemon: warm pools with real sandboxes (issue 3 acceptance 4):
//! pre-warm to target, warm claims, reset-and-return, drain; and the host after drain (5).
mod bwrap_support;
mod common;

use bwrap_support::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn pool_policy(class: &str, min: u32, target: u32, max: u32) -> String {
    bwrap_policy(class, &format!("[pool]\nenabled = true\nmin = {min}\ntarget = {target}\nmax = {max}\nwarm_ttl = \"10m\"\nreset_mode = \"overlayfs-rollback\"\n"))
}

fn warm_ids(bw: &Bw) -> BTreeSet<String> {
    bw.d.ids("state=warm").into_iter().collect()
}

/// Waits until the pool holds `n` warm sandboxes and nothing is being created.
fn wait_warm(bw: &Bw, class: &str, n: u64, timeout: Duration) {
    wait_until(
        &format!("{n} warm sandboxes in pool {class}"),
        timeout,
        || {
            bw.d.warm_count("bubblewrap", class) == n
                && warm_ids(bw).len() as u64 == n
                && bw.d.ids("state=creating").is_empty()
        },
    );
}

#[test]
fn pool_prewarms_to_target_claims_warm_and_drain_leaves_nothing() {
    let class = "bw-pool";
    let Some(bw) = Bw::start(vec![("p.toml", pool_policy(class, 0, 4, 4))]) else {
        return;
    };
    let t0 = Instant::now();
    wait_warm(&bw, class, 4, Duration::from_secs(60));
    eprintln!(
        "pool reached 4 warm sandboxes {:?} after the template import",
        t0.elapsed()
    );
    let pools = bw.d.get("/v1/pools").json();
    let pool = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"]["workload_class"] == class)
        .unwrap_or_else(|| panic!("{pools}"));
    assert_eq!(pool["key"]["backend"], "bubblewrap", "{pool}");
    assert_eq!(pool["stats"]["warm_count"], 4, "{pool}");
    assert_eq!(pool["stats"]["target"], 4, "{pool}");

    // Four real sandboxes on the host.
    let warm = warm_ids(&bw);
    let fps: Vec<Footprint> = warm.iter().map(|id| bw.footprint(id)).collect();
    assert_eq!(bw.agents_in_root().len(), 4, "{:?}", bw.agents_in_root());

    // A claim takes a warm sandbox, which works at once; the pool refills to 4.
    let t1 = Instant::now();
    let r = bw.d.post("/v1/instances", json!({"workload_class": class}));
    let claim_ms = t1.elapsed();
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["start_path"], "warm", "{v}");
    assert_eq!(v["instance"]["state"], "running", "{v}");
    let claimed = v["instance"]["id"].as_str().unwrap().to_string();
    eprintln!("warm claim answered in {claim_ms:?}");
    assert!(
        warm.contains(&claimed),
        "claimed {claimed} was not one of the warm {warm:?}"
    );
    assert_eq!(bw.sh(&claimed, "echo warm"), "warm\n");
    wait_warm(&bw, class, 4, Duration::from_secs(30));
    let stats = bw.d.pool_stats("bubblewrap", class).unwrap();
    assert!(stats["total_hits"].as_u64().unwrap() >= 1, "{stats}");

    // Drain destroys exactly the warm ones.
    let warm_now = warm_ids(&bw);
    let mut fps: Vec<Footprint> = fps
        .into_iter()
        .filter(|f| warm_now.contains(&f.name))
        .collect();
    let refilled: Vec<String> = warm_now
        .iter()
        .filter(|id| !fps.iter().any(|f| &f.name == *id))
        .cloned()
        .collect();
    fps.extend(refilled.iter().map(|id| bw.footprint(id)));
    let r =
        bw.d.post(&format!("/v1/pools/bubblewrap/{class}/drain"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["count"], 4, "{v}");
    let drained: BTreeSet<String> = v["drained"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    assert_eq!(drained, warm_now);
    for fp in &fps {
        let inst = bw.instance(&fp.name);
        assert_eq!(
            (inst["state"].as_str(), inst["termination_reason"].as_str()),
            (Some("destroyed"), Some("drained")),
            "{inst}"
        );
        bw.assert_gone(fp);
    }
    // No bwrap or agent of the drained sandboxes is alive: only the claimed one's remain.
    let agents = bw.agents_in_root();
    assert_eq!(agents.len(), 1, "agents left after drain: {agents:?}");
    let cg_claimed = format!("/{}/{}", bw.root, claimed);
    assert!(
        cgroup_paths(agents[0].0)
            .iter()
            .any(|c| c.ends_with(&cg_claimed)),
        "{agents:?}"
    );
    let bwraps: Vec<_> = processes_mentioning(&bw.instances_dir().to_string_lossy())
        .into_iter()
        .filter(|(_, c)| c.starts_with(BWRAP))
        .collect();
    assert_eq!(bwraps.len(), 1, "bwrap processes after drain: {bwraps:?}");
    assert!(bwraps[0].1.contains(&claimed), "{bwraps:?}");

    // A drained pool stays empty.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(bw.d.warm_count("bubblewrap", class), 0);
    assert!(warm_ids(&bw).is_empty());

    let fp = bw.footprint(&claimed);
    assert_eq!(bw.d.delete(&format!("/v1/instances/{claimed}")).status, 200);
    bw.assert_gone(&fp);
    bw.finish();
}

#[test]
fn reset_returns_a_claimed_sandbox_to_its_pool() {
    let class = "bw-pool-return";
    let Some(bw) = Bw::start(vec![("p.toml", pool_policy(class, 0, 1, 2))]) else {
        return;
    };
    wait_warm(&bw, class, 1, Duration::from_secs(30));
    let id = bw.create(class);
    assert_eq!(bw.instance(&id)["start_path"], "warm");
    wait_warm(&bw, class, 1, Duration::from_secs(30));
    assert_eq!(bw.put_file(&id, "/root/used", b"by a client").status, 200);
    let before = bw.footprint(&id);

    let r = bw.d.post(
        &format!("/v1/instances/{id}/reset"),
        json!({"return_to_pool": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["returned_to_pool"], true, "{v}");
    assert_eq!(v["instance"]["state"], "warm", "{v}");
    bw.assert_procs_gone(&before);
    let after = bw.footprint(&id);
    assert!(!after.instance_dir.join("upper/root/used").exists());
    assert_eq!(bw.d.warm_count("bubblewrap", class), 2);

    // The next claims get warm sandboxes; the returned one comes back clean.
    let mut claimed = Vec::new();
    for _ in 0..2 {
        let r = bw.d.post("/v1/instances", json!({"workload_class": class}));
        assert_eq!(r.status, 201, "{}", r.text());
        assert_eq!(r.json()["start_path"], "warm");
        claimed.push(r.json()["instance"]["id"].as_str().unwrap().to_string());
    }
    assert!(
        claimed.contains(&id),
        "{claimed:?} does not hold the returned {id}"
    );
    assert_eq!(bw.get_file(&id, "/root/used").status, 404);

    wait_warm(&bw, class, 1, Duration::from_secs(30));
    let warm: Vec<String> = warm_ids(&bw).into_iter().collect();
    let mut fps: Vec<Footprint> = claimed
        .iter()
        .chain(warm.iter())
        .map(|i| bw.footprint(i))
        .collect();
    let r =
        bw.d.post(&format!("/v1/pools/bubblewrap/{class}/drain"), json!({}));
    assert_eq!(r.json()["count"], 1, "{}", r.text());
    for id in &claimed {
        assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
    }
    for fp in fps.drain(..) {
        bw.assert_gone(&fp);
    }
    bw.finish();
}

/// A reset in place on a class with a warm pool takes over a warm twin's fresh sandbox and
/// retires the used one in the background; with the pool empty it resets in place.
#[test]
fn reset_in_place_takes_over_a_warm_sandbox_and_retires_the_used_one() {
    let class = "bw-pool-swap";
    let Some(bw) = Bw::start(vec![("p.toml", pool_policy(class, 0, 1, 2))]) else {
        return;
    };
    wait_warm(&bw, class, 1, Duration::from_secs(30));
    let id = bw.create(class);
    wait_warm(&bw, class, 1, Duration::from_secs(30));
    let twin = warm_ids(&bw).into_iter().next().unwrap();
    assert_eq!(bw.put_file(&id, "/root/used", b"by a client").status, 200);
    bw.sh(&id, "sleep 1000 >/dev/null 2>&1 &");
    let used = bw.footprint(&id);

    let r = bw.d.post(
        &format!("/v1/instances/{id}/reset"),
        json!({"return_to_pool": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["from_pool"], true, "{v}");
    assert_eq!(v["returned_to_pool"], false, "{v}");
    assert_eq!(v["mode"], "overlayfs-rollback", "{v}");
    assert_eq!(v["instance"]["state"], "running", "{v}");
    assert_eq!(v["instance"]["id"], id.as_str(), "{v}");
    assert_eq!(v["instance"]["reset_count"], 1, "{v}");

    // Same id, clean filesystem, a working agent: now in the twin's sandbox.
    assert_eq!(bw.get_file(&id, "/root/used").status, 404);
    assert_eq!(bw.sh(&id, "echo fresh"), "fresh\n");
    let now = bw.footprint(&twin);
    assert!(now.procs.len() >= 2, "{:?}", now.procs);

    // The used sandbox (its processes, the background sleep, cgroup, overlay, directory)
    // is destroyed in the background under the twin's record.
    wait_until(
        "the used sandbox to be gone",
        Duration::from_secs(20),
        || bw.instance(&twin)["state"] == "destroyed",
    );
    let t = bw.instance(&twin);
    assert_eq!(t["termination_reason"], "recycled", "{t}");
    bw.assert_gone(&used);

    // The pool refills; then, drained, a reset happens in place and works too.
    wait_warm(&bw, class, 1, Duration::from_secs(30));
    let r =
        bw.d.post(&format!("/v1/pools/bubblewrap/{class}/drain"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(bw.put_file(&id, "/root/again", b"x").status, 200);
    let r = bw.d.post(&format!("/v1/instances/{id}/reset"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["from_pool"], false, "{}", r.text());
    assert_eq!(bw.get_file(&id, "/root/again").status, 404);
    assert_eq!(bw.sh(&id, "echo in-place"), "in-place\n");

    let fp = bw.footprint(&twin);
    assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
    bw.assert_gone(&fp);
    bw.finish();
}
