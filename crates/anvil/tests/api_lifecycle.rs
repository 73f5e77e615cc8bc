//! Instance lifecycle with the mock backend (SPEC §3, §4): create, list filters, files,
//! pause/resume, checkpoints and their lineage, fork, rollback, reset, TTL, destroy,
//! idempotent create, hibernation.
mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

fn file(d: &Daemon, id: &str, path: &str) -> Response {
    d.get(&format!("/v1/instances/{id}/files?path={path}"))
}

fn put_file(d: &Daemon, id: &str, path: &str, data: &[u8]) {
    let r = d.put(
        &format!("/v1/instances/{id}/files?path={path}"),
        data.to_vec(),
    );
    assert_eq!(r.status, 200, "PUT {path}: {}", r.text());
    assert_eq!(r.json()["bytes"], data.len());
}

#[test]
fn create_get_list_and_filters() {
    let d = Daemon::start(Opts::default());
    let r = d.post("/v1/instances", json!({"workload_class": "mock-class", "labels": {"team": "a", "env": "ci"}, "kernel_version": "6.1"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let c = r.json();
    assert_eq!(c["start_path"], "cold");
    assert_eq!(c["decision"]["policy"], "mock-default");
    assert_eq!(c["decision"]["backend"], "mock");
    let inst = &c["instance"];
    let a = inst["id"].as_str().unwrap().to_string();
    assert_eq!(inst["state"], "running");
    assert_eq!(inst["start_path"], "cold");
    assert_eq!(inst["policy"], "mock-default");
    assert_eq!(inst["backend"], "mock");
    assert_eq!(inst["kernel_version"], "6.1");
    assert!(inst["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(inst["termination_reason"].is_null());
    assert_eq!(d.instance(&a), *inst, "GET shows what create returned");
    // The mock sandbox really exists on disk.
    assert!(d
        .state_dir()
        .join("instances")
        .join(&a)
        .join("mock/state.json")
        .is_file());

    let b = d.create(json!({"workload_class": "mock-pooled", "labels": {"team": "b"}}));
    let c2 =
        d.create(json!({"workload_class": "mock-class", "labels": {"team": "b", "env": "ci"}}));
    d.post(&format!("/v1/instances/{c2}/pause"), json!({}));

    let mut all = d.ids("");
    all.sort();
    let mut want = vec![a.clone(), b.clone(), c2.clone()];
    want.sort();
    assert_eq!(all, want);
    assert_eq!(d.ids("state=paused"), vec![c2.clone()]);
    let mut running = d.ids("state=running");
    running.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(running, want);
    assert_eq!(d.ids("workload_class=mock-pooled"), vec![b.clone()]);
    assert_eq!(d.ids("label=team=a"), vec![a.clone()]);
    let mut team_b = d.ids("label=team=b");
    team_b.sort();
    let mut want = vec![b.clone(), c2.clone()];
    want.sort();
    assert_eq!(team_b, want);
    assert_eq!(d.ids("label=team=b,env=ci"), vec![c2.clone()]);
    assert_eq!(d.ids("label=team=b&state=running"), vec![b.clone()]);
    assert_eq!(
        d.ids("workload_class=mock-class&label=env=ci&state=paused"),
        vec![c2.clone()]
    );
    assert!(d.ids("label=team=zzz").is_empty());
    // Destroyed instances are listed only when asked for.
    d.delete(&format!("/v1/instances/{b}"));
    assert!(!d.ids("").contains(&b));
    assert_eq!(d.ids("state=destroyed"), vec![b]);
}

#[test]
fn files_pause_resume() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    put_file(&d, &id, "/work/deep/dir/blob.bin", &data);
    let r = file(&d, &id, "/work/deep/dir/blob.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data, "binary round trip");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/octet-stream"
    );
    // The bytes live inside the sandbox's own directory, nowhere else.
    let on_disk = d
        .state_dir()
        .join("instances")
        .join(&id)
        .join("mock/fs/work/deep/dir/blob.bin");
    assert_eq!(std::fs::read(on_disk).unwrap(), data);
    // Escapes are refused.
    assert_eq!(file(&d, &id, "/../../../etc/hostname").status, 400);

    let p = d.post(&format!("/v1/instances/{id}/pause"), json!({}));
    assert_eq!(p.status, 200);
    assert_eq!(p.json()["state"], "paused");
    assert_eq!(d.state_of(&id), "paused");
    expect_error(
        &file(&d, &id, "/work/deep/dir/blob.bin"),
        409,
        Some("state_conflict"),
    );
    expect_error(
        &d.put(&format!("/v1/instances/{id}/files?path=/x"), b"x".to_vec()),
        409,
        Some("state_conflict"),
    );
    let r = d.post(&format!("/v1/instances/{id}/resume"), json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "running");
    assert_eq!(file(&d, &id, "/work/deep/dir/blob.bin").body, data);
}

#[test]
fn checkpoints_lineage_fork_rollback_reset() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    put_file(&d, &id, "/state.txt", b"one");
    let ck1 = d.post(&format!("/v1/instances/{id}/checkpoint"), json!({}));
    assert_eq!(ck1.status, 200, "{}", ck1.text());
    let ck1 = ck1.json()["checkpoint_id"].as_str().unwrap().to_string();
    assert_eq!(
        d.state_of(&id),
        "running",
        "a plain checkpoint keeps it running"
    );
    put_file(&d, &id, "/state.txt", b"two");
    put_file(&d, &id, "/only-in-two.txt", b"x");
    let ck2 = d
        .post(
            &format!("/v1/instances/{id}/checkpoint"),
            json!({"stop": false}),
        )
        .json()["checkpoint_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(ck1, ck2);

    let cks = d.get(&format!("/v1/instances/{id}/checkpoints")).json();
    let cks = cks.as_array().unwrap();
    assert_eq!(cks.len(), 2);
    assert_eq!(cks[0]["checkpoint_id"], ck1.as_str());
    assert!(cks[0]["parent"].is_null(), "{cks:?}");
    assert_eq!(cks[1]["checkpoint_id"], ck2.as_str());
    assert_eq!(
        cks[1]["parent"],
        ck1.as_str(),
        "second checkpoint's parent is the first"
    );
    for c in cks {
        assert_eq!(c["instance_id"], id.as_str());
        assert_eq!(c["kind"], "filesystem");
        assert!(c["created_at"].is_string() && c["size_bytes"].as_u64().unwrap() > 0);
    }

    // Fork from the first checkpoint: a new instance with that content.
    let r = d.post(
        "/v1/instances",
        json!({"workload_class": "mock-class", "from_checkpoint": ck1}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let fork = r.json();
    assert_eq!(fork["start_path"], "restore");
    assert_eq!(fork["instance"]["start_path"], "restore");
    assert_eq!(fork["instance"]["from_checkpoint"], ck1.as_str());
    let f = fork["instance"]["id"].as_str().unwrap().to_string();
    assert_ne!(f, id);
    assert_eq!(file(&d, &f, "/state.txt").body, b"one");
    assert_eq!(file(&d, &f, "/only-in-two.txt").status, 404);
    // The fork is independent of its origin.
    put_file(&d, &f, "/state.txt", b"fork");
    assert_eq!(file(&d, &id, "/state.txt").body, b"two");

    // Roll the origin back to ck1, then forward to ck2 (tree search).
    put_file(&d, &id, "/state.txt", b"three");
    let r = d.post(
        &format!("/v1/instances/{id}/rollback"),
        json!({"checkpoint_id": ck1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["from_checkpoint"], ck1.as_str());
    assert_eq!(file(&d, &id, "/state.txt").body, b"one");
    assert_eq!(file(&d, &id, "/only-in-two.txt").status, 404);
    d.post(
        &format!("/v1/instances/{id}/rollback"),
        json!({"checkpoint_id": ck2}),
    );
    assert_eq!(file(&d, &id, "/state.txt").body, b"two");
    assert_eq!(file(&d, &id, "/only-in-two.txt").body, b"x");
    // A paused instance rolls back and runs again.
    d.post(&format!("/v1/instances/{id}/pause"), json!({}));
    let r = d.post(
        &format!("/v1/instances/{id}/rollback"),
        json!({"checkpoint_id": ck1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(file(&d, &id, "/state.txt").body, b"one");

    // Reset wipes the sandbox's files.
    let r = d.post(&format!("/v1/instances/{id}/reset"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let reset = r.json();
    assert_eq!(reset["instance"]["reset_count"], 1);
    assert_eq!(reset["instance"]["state"], "running");
    assert_eq!(reset["returned_to_pool"], false);
    assert_eq!(reset["mode"], "overlayfs-rollback");
    assert_eq!(file(&d, &id, "/state.txt").status, 404);
    assert_eq!(d.instance(&id)["reset_count"], 1);
    let r = d.post(
        &format!("/v1/instances/{id}/reset"),
        json!({"return_to_pool": true}),
    );
    assert_eq!(
        r.json()["returned_to_pool"],
        false,
        "no pool: stays running"
    );
    assert_eq!(d.instance(&id)["reset_count"], 2);
    assert_eq!(d.state_of(&id), "running");

    // Delete a checkpoint: 204, then gone (404), and its files with it.
    let ck_dir = d.state_dir().join("checkpoints").join(&ck2);
    assert!(ck_dir.is_dir());
    assert_eq!(d.delete(&format!("/v1/checkpoints/{ck2}")).status, 204);
    assert!(!ck_dir.exists(), "checkpoint files removed");
    expect_error(
        &d.delete(&format!("/v1/checkpoints/{ck2}")),
        404,
        Some("not_found"),
    );
    expect_error(
        &d.post(
            &format!("/v1/instances/{id}/rollback"),
            json!({"checkpoint_id": ck2}),
        ),
        404,
        Some("not_found"),
    );
    let left = d.get(&format!("/v1/instances/{id}/checkpoints")).json();
    assert_eq!(left.as_array().unwrap().len(), 1);
}

#[test]
fn hibernate_and_resume() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    put_file(&d, &id, "/keep.txt", b"survives hibernation");
    let r = d.post(
        &format!("/v1/instances/{id}/checkpoint"),
        json!({"stop": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let ck = r.json()["checkpoint_id"].as_str().unwrap().to_string();
    let inst = d.instance(&id);
    assert_eq!(inst["state"], "checkpointed");
    assert_eq!(inst["from_checkpoint"], ck.as_str());
    // Every runtime resource is released: the sandbox directory is gone.
    assert!(
        !d.state_dir()
            .join("instances")
            .join(&id)
            .join("mock")
            .exists(),
        "hibernated sandbox still on disk"
    );
    expect_error(&file(&d, &id, "/keep.txt"), 409, Some("state_conflict"));
    expect_error(
        &d.post(&format!("/v1/instances/{id}/pause"), json!({})),
        409,
        Some("state_conflict"),
    );
    let r = d.post(&format!("/v1/instances/{id}/resume"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(file(&d, &id, "/keep.txt").body, b"survives hibernation");
    // And it can be hibernated from paused, too.
    d.post(&format!("/v1/instances/{id}/pause"), json!({}));
    let r = d.post(
        &format!("/v1/instances/{id}/checkpoint"),
        json!({"stop": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.state_of(&id), "checkpointed");
    assert_eq!(
        d.post(&format!("/v1/instances/{id}/resume"), json!({}))
            .status,
        200
    );
    assert_eq!(file(&d, &id, "/keep.txt").body, b"survives hibernation");
}

#[test]
fn ttl_set_and_expiry() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    assert!(d.instance(&id)["expires_at"].is_null());
    let r = d.post(
        &format!("/v1/instances/{id}/ttl"),
        json!({"ttl_secs": 3600}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let exp = r.json()["expires_at"].as_str().unwrap().to_string();
    let exp = chrono::DateTime::parse_from_rfc3339(&exp)
        .unwrap()
        .timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (exp - now - 3600).abs() <= 5,
        "expires_at about an hour from now: {exp} vs {now}"
    );
    assert_eq!(d.instance(&id)["ttl_secs"], 3600);

    let short = d.create(json!({"workload_class": "mock-class", "ttl_secs": 1}));
    assert_eq!(d.instance(&short)["ttl_secs"], 1);
    // Shorten the first one's TTL too: both expire.
    d.post(&format!("/v1/instances/{id}/ttl"), json!({"ttl_secs": 1}));
    let keep = d.create(json!({"workload_class": "mock-class", "ttl_secs": 600}));
    d.wait_for("TTL expiry", Duration::from_secs(4), || {
        d.state_of(&short) == "destroyed" && d.state_of(&id) == "destroyed"
    });
    for x in [&short, &id] {
        let i = d.instance(x);
        assert_eq!(i["termination_reason"], "ttl-expired", "{i}");
        assert!(i["destroyed_at"].is_string());
        assert!(
            !d.state_dir().join("instances").join(x).exists(),
            "expired sandbox dir removed"
        );
    }
    assert_eq!(d.state_of(&keep), "running");
}

#[test]
fn destroy_both_ways_and_idempotent_create() {
    let d = Daemon::start(Opts::default());
    let a = d.create(json!({"workload_class": "mock-class"}));
    let b = d.create(json!({"workload_class": "mock-class"}));
    let r = d.post(&format!("/v1/instances/{a}/destroy"), json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"destroyed": true, "instance_id": a}));
    let r = d.delete(&format!("/v1/instances/{b}"));
    assert_eq!(r.json(), json!({"destroyed": true, "instance_id": b}));
    for x in [&a, &b] {
        let i = d.instance(x);
        assert_eq!(i["state"], "destroyed");
        assert_eq!(i["termination_reason"], "requested");
        assert!(
            !d.state_dir().join("instances").join(x).exists(),
            "sandbox dir removed"
        );
    }
    // Destroying again is harmless and keeps the first reason.
    assert_eq!(d.delete(&format!("/v1/instances/{a}")).status, 200);
    assert_eq!(d.instance(&a)["termination_reason"], "requested");

    // Idempotent create by client id.
    let body = json!({"workload_class": "mock-class", "id": "job-42", "labels": {"k": "v"}, "env": {"A": "1"}});
    let r1 = d.post("/v1/instances", body.clone());
    assert_eq!(r1.status, 201, "{}", r1.text());
    assert_eq!(r1.json()["instance"]["id"], "job-42");
    let r2 = d.post("/v1/instances", body.clone());
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(r2.json()["instance"]["id"], "job-42");
    assert_eq!(
        r2.json()["instance"]["created_at"],
        r1.json()["instance"]["created_at"]
    );
    assert_eq!(r2.json()["decision"], r1.json()["decision"]);
    assert_eq!(
        d.ids("label=k=v"),
        vec!["job-42".to_string()],
        "no second instance"
    );
    expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "id": "job-42"}),
        ),
        409,
        Some("idempotency_conflict"),
    );
}

#[test]
fn checkpoint_lineage_follows_rollbacks_forks_and_resets() {
    let d = Daemon::start(Opts::default());
    let ck = |id: &str| {
        let r = d.post(&format!("/v1/instances/{id}/checkpoint"), json!({}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["checkpoint_id"].as_str().unwrap().to_string()
    };
    let parent_of = |id: &str, ck: &str| {
        let all = d.get(&format!("/v1/instances/{id}/checkpoints")).json();
        let c = all
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["checkpoint_id"] == ck)
            .unwrap()
            .clone();
        c["parent"].as_str().map(str::to_string)
    };
    let id = d.create(json!({"workload_class": "mock-class"}));
    let a = ck(&id);
    let b = ck(&id);
    assert_eq!(parent_of(&id, &b).as_deref(), Some(a.as_str()));
    // Undo to `a`, then checkpoint: the new one branches off `a`, not off `b`.
    d.post(
        &format!("/v1/instances/{id}/rollback"),
        json!({"checkpoint_id": a}),
    );
    let c = ck(&id);
    assert_eq!(
        parent_of(&id, &c).as_deref(),
        Some(a.as_str()),
        "tree, not a list"
    );
    let e = ck(&id);
    assert_eq!(parent_of(&id, &e).as_deref(), Some(c.as_str()));
    // A fork's first checkpoint descends from the checkpoint it was forked from.
    let f = d
        .post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "from_checkpoint": b}),
        )
        .json()["instance"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let g = ck(&f);
    assert_eq!(parent_of(&f, &g).as_deref(), Some(b.as_str()));
    // After a reset the sandbox is fresh: no parent.
    d.post(&format!("/v1/instances/{id}/reset"), json!({}));
    let h = ck(&id);
    assert_eq!(parent_of(&id, &h), None);
    // The lineage survives a restart.
    let mut d = d;
    d.kill9();
    d.spawn();
    let i = {
        let r = d.post(&format!("/v1/instances/{id}/checkpoint"), json!({}));
        r.json()["checkpoint_id"].as_str().unwrap().to_string()
    };
    let all = d.get(&format!("/v1/instances/{id}/checkpoints")).json();
    let ci = all
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["checkpoint_id"] == i.as_str())
        .unwrap()
        .clone();
    assert_eq!(ci["parent"], h.as_str());
}
