//! bubblewrap on the real daemon: reset, checkpoint + fork, pause/resume (issue 3
//! acceptance 3) and the host after reset, TTL expiry and supervision (5).
mod bwrap_support;
mod common;

use bwrap_support::*;
use serde_json::json;
use std::time::{Duration, Instant};

const CLASS: &str = "bw-life";

fn policy() -> String {
    bwrap_policy(CLASS, "[pool]\nenabled = false\nreset_mode = \"overlayfs-rollback\"\n[checkpoint]\nenabled = true\n")
}

/// Host pid of the process in cgroup `name` whose command line is `cmd`, waiting for it.
fn find_in_cgroup(bw: &Bw, name: &str, cmd: &str) -> (i32, u64) {
    let mut found = None;
    wait_until(
        &format!("`{cmd}` in cgroup {name}"),
        Duration::from_secs(5),
        || {
            found = bw
                .cgroup_procs(name)
                .into_iter()
                .find(|p| cmdline(*p).as_deref() == Some(cmd));
            found.is_some()
        },
    );
    let pid = found.unwrap();
    (pid, start_time(pid).unwrap())
}

/// Starts `script` detached from the exec (own session, no inherited pipes).
fn spawn_detached(bw: &Bw, id: &str, script: &str) {
    bw.sh(id, &format!("setsid {script} </dev/null >/dev/null 2>&1 &"));
}

#[test]
fn reset_reverts_files_and_kills_background_processes() {
    let Some(bw) = Bw::start(vec![("l.toml", policy())]) else {
        return;
    };
    let id = bw.create(CLASS);
    let tpl_hostname = std::fs::read_to_string(bw.template_rootfs.join("etc/hostname")).unwrap();

    assert_eq!(
        bw.put_file(&id, "/root/state.txt", b"before reset").status,
        200
    );
    bw.sh(&id, "echo changed > /etc/hostname && rm /etc/group");
    spawn_detached(&bw, &id, "sleep 1000");
    let sleeper = find_in_cgroup(&bw, &id, "sleep 1000");
    let fp = bw.footprint(&id);
    assert!(fp.procs.contains(&sleeper));
    let upper = fp.instance_dir.join("upper");
    assert!(upper.join("root/state.txt").is_file());

    let t0 = Instant::now();
    let r = bw.d.post(&format!("/v1/instances/{id}/reset"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!("reset took {:?}", t0.elapsed());
    let v = r.json();
    assert_eq!(v["mode"], "overlayfs-rollback", "{v}");
    assert_eq!(v["returned_to_pool"], false, "{v}");
    assert_eq!(v["instance"]["state"], "running", "{v}");
    assert_eq!(v["instance"]["reset_count"], 1, "{v}");

    // Every old process is gone, the sleeper included; the cgroup is the same and holds
    // only the new sandbox; the overlay is mounted once; the upper layer is fresh.
    let sleeper_alive =
        start_time(sleeper.0) == Some(sleeper.1) && proc_state(sleeper.0) != Some('Z');
    assert!(
        !sleeper_alive,
        "sleep 1000 (host pid {}) survived the reset",
        sleeper.0
    );
    bw.assert_procs_gone(&fp);
    let new_procs = bw.cgroup_procs(&id);
    assert!(
        new_procs.len() >= 2
            && new_procs
                .iter()
                .all(|p| !fp.procs.iter().any(|(o, _)| o == p)),
        "{new_procs:?} vs {:?}",
        fp.procs
    );
    assert!(!new_procs
        .iter()
        .any(|p| cmdline(*p).as_deref() == Some("sleep 1000")));
    assert_eq!(
        bw.mounts_of(&fp.instance_dir).len(),
        1,
        "{:#?}",
        bw.mounts_of(&fp.instance_dir)
    );
    assert!(
        !upper.join("root/state.txt").exists(),
        "upper layer kept the written file"
    );
    let r = bw.get_file(&id, "/root/state.txt");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(bw.sh(&id, "cat /etc/hostname"), tpl_hostname);
    assert!(bw.sh(&id, "cat /etc/group").contains("root:x:0:"));
    assert_eq!(bw.sh(&id, "ps -o comm | grep -c sleep || true").trim(), "0");

    let fp2 = bw.footprint(&id);
    assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
    bw.assert_gone(&fp2);
    bw.finish();
}

#[test]
fn checkpoint_then_fork_yields_a_sandbox_with_the_file() {
    let Some(bw) = Bw::start(vec![("l.toml", policy())]) else {
        return;
    };
    let a = bw.create(CLASS);
    assert_eq!(bw.put_file(&a, "/root/ck.txt", b"checkpointed").status, 200);
    bw.sh(&a, "rm /etc/group");
    let r =
        bw.d.post(&format!("/v1/instances/{a}/checkpoint"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let ck = r.json();
    assert_eq!(ck["kind"], "filesystem", "{ck}");
    assert!(ck["size_bytes"].as_u64().unwrap() >= 12, "{ck}");
    let ck_id = ck["checkpoint_id"].as_str().unwrap().to_string();
    let ck_dir = bw.d.state_dir().join("checkpoints").join(&ck_id);
    assert_eq!(
        std::fs::read(ck_dir.join("upper/root/ck.txt")).unwrap(),
        b"checkpointed"
    );
    // Changes after the checkpoint do not reach the fork.
    assert_eq!(bw.put_file(&a, "/root/ck.txt", b"after").status, 200);

    let r = bw.d.post(
        "/v1/instances",
        json!({"workload_class": CLASS, "from_checkpoint": ck_id}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["start_path"], "restore", "{v}");
    let b = v["instance"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["instance"]["from_checkpoint"], ck_id.as_str());
    let r = bw.get_file(&b, "/root/ck.txt");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"checkpointed"[..]));
    assert_eq!(bw.sh(&b, "cat /root/ck.txt"), "checkpointed");
    assert_ne!(
        bw.exec(&b, &["cat", "/etc/group"])["exit_code"],
        0,
        "the deletion was not forked"
    );
    assert_eq!(bw.get_file(&a, "/root/ck.txt").body, b"after");
    // The two are independent.
    assert_eq!(bw.put_file(&b, "/root/only-b", b"b").status, 200);
    assert_eq!(bw.get_file(&a, "/root/only-b").status, 404);

    let (fa, fb) = (bw.footprint(&a), bw.footprint(&b));
    assert_ne!(fa.instance_dir, fb.instance_dir);
    for (id, fp) in [(&a, &fa), (&b, &fb)] {
        assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
        bw.assert_gone(fp);
    }
    // The checkpoint outlives its instance until deleted.
    assert!(ck_dir.is_dir());
    assert_eq!(bw.d.delete(&format!("/v1/checkpoints/{ck_id}")).status, 204);
    assert!(!ck_dir.exists());
    bw.finish();
}

#[test]
fn pause_stops_a_counter_and_resume_restarts_it() {
    let Some(bw) = Bw::start(vec![("l.toml", policy())]) else {
        return;
    };
    let id = bw.create(CLASS);
    let fp = bw.footprint(&id);
    let counter = fp.instance_dir.join("upper/root/counter");
    let len = || std::fs::metadata(&counter).map(|m| m.len()).unwrap_or(0);
    spawn_detached(
        &bw,
        &id,
        "sh -c 'while :; do echo x >> /root/counter; sleep 0.05; done'",
    );
    wait_until("the counter to run", Duration::from_secs(5), || len() >= 10);

    let r = bw.d.post(&format!("/v1/instances/{id}/pause"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused");
    assert_eq!(
        bw.cgroup_file(&id, "freezer", "freezer.state").trim(),
        "FROZEN"
    );
    let l1 = len();
    std::thread::sleep(Duration::from_millis(700));
    let l2 = len();
    assert_eq!(l1, l2, "the counter advanced while paused");
    // A paused sandbox runs nothing.
    let r = bw.d.post(
        &format!("/v1/instances/{id}/exec"),
        json!({"cmd": ["true"]}),
    );
    assert_eq!(r.status, 409, "{}", r.text());

    let r = bw.d.post(&format!("/v1/instances/{id}/resume"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(
        bw.cgroup_file(&id, "freezer", "freezer.state").trim(),
        "THAWED"
    );
    std::thread::sleep(Duration::from_millis(700));
    let l3 = len();
    eprintln!("counter bytes: paused {l1} -> {l2}, resumed -> {l3}");
    assert!(l3 >= l2 + 10, "the counter did not restart: {l2} -> {l3}");

    assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
    bw.assert_gone(&fp);
    bw.finish();
}

#[test]
fn ttl_expiry_destroys_the_sandbox_and_cleans_the_host() {
    let Some(bw) = Bw::start(vec![("l.toml", policy())]) else {
        return;
    };
    let t0 = Instant::now();
    let id = bw.create_body(json!({"workload_class": CLASS, "ttl_secs": 1}));
    let fp = bw.footprint(&id);
    let v = bw.wait_destroyed(&id, Duration::from_secs(5));
    eprintln!("ttl 1 s: destroyed {:?} after create", t0.elapsed());
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(v["termination_reason"], "ttl-expired", "{v}");
    bw.assert_gone(&fp);
    bw.finish();
}

#[test]
fn sandbox_killed_from_outside_is_destroyed_as_exited() {
    let Some(bw) = Bw::start(vec![("l.toml", policy())]) else {
        return;
    };
    let id = bw.create(CLASS);
    let fp = bw.footprint(&id);
    let bwrap = fp
        .procs
        .iter()
        .find(|(p, _)| cmdline(*p).is_some_and(|c| c.starts_with(BWRAP)))
        .expect("no bwrap process in the cgroup")
        .0;
    let t0 = Instant::now();
    unsafe { libc::kill(bwrap, libc::SIGKILL) };
    let v = bw.wait_destroyed(&id, Duration::from_secs(3));
    eprintln!(
        "killed bwrap noticed and destroyed after {:?}",
        t0.elapsed()
    );
    assert_eq!(v["termination_reason"], "exited", "{v}");
    bw.assert_gone(&fp);
    bw.finish();
}

#[test]
fn hibernate_releases_everything_and_resume_brings_the_files_back() {
    let Some(bw) = Bw::start(vec![("l.toml", policy())]) else {
        return;
    };
    let id = bw.create(CLASS);
    assert_eq!(
        bw.put_file(&id, "/root/keep.txt", b"kept across hibernation")
            .status,
        200
    );
    let fp = bw.footprint(&id);
    let r = bw.d.post(
        &format!("/v1/instances/{id}/checkpoint"),
        json!({"stop": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(bw.instance(&id)["state"], "checkpointed");
    // Hibernated: no process, cgroup, mount or instance directory is held.
    bw.assert_gone(&fp);

    let r = bw.d.post(&format!("/v1/instances/{id}/resume"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "running");
    assert_eq!(bw.sh(&id, "cat /root/keep.txt"), "kept across hibernation");
    let fp = bw.footprint(&id);
    assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
    bw.assert_gone(&fp);
    bw.finish();
}
