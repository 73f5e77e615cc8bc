//! Reliability (issue 5): daemon restarts with real sandboxes. `kill -9` of the daemon, then a
//! new daemon re-adopts every live sandbox (same processes, checked in /proc), rebuilds pools
//! without duplicates, cleans up sandboxes that died while it was down (and ones it was in the
//! middle of creating), and honours `[daemon].shutdown = keep|destroy` on SIGTERM. Firecracker
//! (test guest) when /dev/kvm and /usr/local/bin/firecracker are usable.
mod bwrap_support;
mod common;

use bwrap_support::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const CLASS: &str = "rel";
const POOLED: &str = "relpool";

fn policies() -> Vec<(&'static str, String)> {
    vec![
        (
            "rel.toml",
            bwrap_policy(
                CLASS,
                "[pool]\nenabled = false\nreset_mode = \"overlayfs-rollback\"\n",
            ),
        ),
        (
            "relpool.toml",
            bwrap_policy(
                POOLED,
                "[pool]\nenabled = true\nmin = 1\ntarget = 2\nmax = 3\nwarm_ttl = \"10m\"\nreset_mode = \"overlayfs-rollback\"\n",
            ),
        ),
    ]
}

/// The live instances: id → JSON (destroyed ones excluded).
fn live(bw: &Bw) -> BTreeMap<String, Value> {
    bw.d.get("/v1/instances")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap().to_string(), i.clone()))
        .collect()
}

/// (pid, start time) of every process in the sandbox's cgroup, sorted.
fn procs(bw: &Bw, name: &str) -> Vec<(i32, u64)> {
    let mut v: Vec<(i32, u64)> = bw
        .cgroup_procs(name)
        .into_iter()
        .filter_map(|p| start_time(p).map(|t| (p, t)))
        .collect();
    v.sort();
    v
}

fn bwrap_pid(bw: &Bw, name: &str) -> i32 {
    bw.cgroup_procs(name)
        .into_iter()
        .find(|p| cmdline(*p).is_some_and(|c| c.starts_with(BWRAP)))
        .unwrap_or_else(|| panic!("no bwrap process in the cgroup of {name}"))
}

/// Rewrites `[daemon].shutdown` in the harness's config (takes effect at the next spawn).
fn set_shutdown(d: &Daemon, mode: &str) {
    let text = std::fs::read_to_string(&d.config).unwrap();
    let text = text
        .replace("shutdown = \"destroy\"", &format!("shutdown = \"{mode}\""))
        .replace("shutdown = \"keep\"", &format!("shutdown = \"{mode}\""));
    std::fs::write(&d.config, text).unwrap();
}

fn wait_warm(bw: &Bw, n: u64) {
    bw.d.wait_for(
        &format!("{n} warm in {POOLED}"),
        Duration::from_secs(30),
        || bw.d.warm_count("bubblewrap", POOLED) == n && bw.d.ids("state=warm").len() as u64 == n,
    );
}

#[test]
fn kill9_readopts_running_paused_and_warm_sandboxes() {
    let Some(mut bw) = Bw::start(policies()) else {
        return;
    };
    wait_warm(&bw, 2);
    let running = bw.create(CLASS);
    let r = bw.put_file(&running, "/kept.txt", b"written before kill -9");
    assert_eq!(r.status, 200, "file PUT: {}", r.text());
    bw.sh(&running, "echo marker > /tmp/in-tmpfs");
    let paused = bw.create(CLASS);
    let r =
        bw.d.post(&format!("/v1/instances/{paused}/pause"), json!({}));
    assert_eq!(r.status, 200, "pause: {}", r.text());
    // A warm claim renamed to a client id keeps its original cgroup/dir name.
    let claimed = bw.create_body(json!({"workload_class": POOLED, "id": "rel-claimed"}));
    wait_warm(&bw, 2);

    let before = live(&bw);
    let warm_before: Vec<String> = bw.d.ids("state=warm");
    assert_eq!(
        before.len(),
        5,
        "running, paused, claimed, 2 warm: {before:?}"
    );
    let names: Vec<String> = before
        .keys()
        .map(|id| {
            if id == &claimed {
                cgroup_name_of(&bw, id)
            } else {
                id.clone()
            }
        })
        .collect();
    let procs_before: Vec<_> = names.iter().map(|n| procs(&bw, n)).collect();
    for (n, p) in names.iter().zip(&procs_before) {
        assert!(
            p.len() >= 2,
            "sandbox {n}: bwrap + agent expected, found {p:?}"
        );
    }
    let bwrap_before = bwrap_pid(&bw, &running);

    let old_pid = bw.d.pid().unwrap();
    bw.d.kill9();
    assert!(
        !Path::new(&format!("/proc/{old_pid}")).exists() || proc_state(old_pid as i32) == Some('Z'),
        "old daemon still running"
    );
    // Sandboxes outlive the daemon.
    for (n, p) in names.iter().zip(&procs_before) {
        assert_eq!(
            &procs(&bw, n),
            p,
            "sandbox {n} changed while the daemon was down"
        );
    }
    let t0 = Instant::now();
    bw.d.spawn();
    eprintln!("restart to serving: {:?}", t0.elapsed());

    let after = live(&bw);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "same instance ids after restart"
    );
    for (id, v) in &before {
        assert_eq!(
            after[id]["state"], v["state"],
            "state of {id} after restart: {}",
            after[id]
        );
        assert_eq!(after[id]["created_at"], v["created_at"], "{id}");
    }
    assert_eq!(after[&running]["state"], "running");
    assert_eq!(after[&paused]["state"], "paused");
    assert_eq!(after[&claimed]["state"], "running");
    for (n, p) in names.iter().zip(&procs_before) {
        assert_eq!(
            &procs(&bw, n),
            p,
            "sandbox {n}: not the same processes after adoption"
        );
    }
    assert_eq!(bwrap_pid(&bw, &running), bwrap_before, "same bwrap pid");

    // The adopted sandboxes work.
    let got = bw.get_file(&running, "/kept.txt");
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.body, b"written before kill -9");
    assert_eq!(bw.sh(&running, "cat /tmp/in-tmpfs"), "marker\n");
    assert_eq!(bw.sh(&claimed, "echo ok"), "ok\n");
    let r =
        bw.d.post(&format!("/v1/instances/{paused}/resume"), json!({}));
    assert_eq!(
        r.status,
        200,
        "resume of adopted paused sandbox: {}",
        r.text()
    );
    assert_eq!(bw.sh(&paused, "echo resumed"), "resumed\n");

    // Pools rebuilt from the adopted warm sandboxes: same ids, nothing extra started.
    assert_eq!(bw.d.warm_count("bubblewrap", POOLED), 2);
    std::thread::sleep(Duration::from_millis(1500));
    let mut warm_after = bw.d.ids("state=warm");
    let mut wb = warm_before.clone();
    warm_after.sort();
    wb.sort();
    assert_eq!(warm_after, wb, "the same warm sandboxes, no duplicates");
    assert_eq!(bw.d.warm_count("bubblewrap", POOLED), 2);
    let dirs = std::fs::read_dir(bw.instances_dir()).unwrap().count();
    assert_eq!(
        dirs, 5,
        "instance dirs after restart (no extra sandbox started)"
    );
    // A claim from the rebuilt pool is served warm, then the pool refills to target.
    let r =
        bw.d.post("/v1/instances", json!({"workload_class": POOLED}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["start_path"], "warm", "{}", r.text());
    wait_warm(&bw, 2);
    let log = bw.d.log();
    assert!(log.contains("re-adopted instance"), "log names adoptions");
    bw.finish();
}

/// The cgroup (and instance dir) name of an instance: its original id when it was a renamed
/// warm claim. Found through the instance dir that is not named after a live id.
fn cgroup_name_of(bw: &Bw, id: &str) -> String {
    if bw.instance_dir(id).is_dir() {
        return id.to_string();
    }
    let ids: Vec<String> = live(bw).keys().cloned().collect();
    let mut orphans: Vec<String> = bw
        .instance_dir_names()
        .into_iter()
        .filter(|n| !ids.contains(n))
        .collect();
    assert_eq!(
        orphans.len(),
        1,
        "exactly one renamed sandbox dir: {orphans:?}"
    );
    orphans.pop().unwrap()
}

#[test]
fn sandbox_killed_while_daemon_down_is_lost_on_restart_and_cleaned() {
    let Some(mut bw) = Bw::start(policies()) else {
        return;
    };
    let keep = bw.create(CLASS);
    let doomed = bw.create(CLASS);
    let fp = bw.footprint(&doomed);
    bw.d.kill9();
    for (p, _) in &fp.procs {
        unsafe { libc::kill(*p, libc::SIGKILL) };
    }
    wait_until(
        "doomed sandbox processes gone",
        Duration::from_secs(5),
        || {
            fp.procs
                .iter()
                .all(|(p, t)| start_time(*p) != Some(*t) || proc_state(*p) == Some('Z'))
        },
    );
    // Its overlay is still mounted and its cgroup still exists: the next daemon cleans them.
    assert_eq!(bw.mounts_of(&fp.instance_dir).len(), 1);
    bw.d.spawn();
    let v = bw.instance(&doomed);
    assert_eq!(v["state"], "destroyed", "{v}");
    assert_eq!(v["termination_reason"], "lost-on-restart", "{v}");
    bw.assert_gone(&fp);
    assert_eq!(bw.instance(&keep)["state"], "running");
    assert_eq!(bw.sh(&keep, "echo alive"), "alive\n");
    assert!(bw.d.log().contains("instance lost across restart"));
    bw.finish();
}

#[test]
fn kill9_in_the_middle_of_create_leaves_nothing_after_restart() {
    // No pool: the only create in flight is the test's.
    let Some(mut bw) = Bw::start(policies().into_iter().take(1).collect()) else {
        return;
    };
    let socket = bw.d.socket.clone();
    // The create is sent from a thread; the daemon is killed while bwrap is starting.
    let sender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let Ok(s) = tokio::net::UnixStream::connect(&socket).await else {
                return;
            };
            let body = serde_json::to_vec(&json!({"workload_class": CLASS})).unwrap();
            let req = hyper::Request::post("/v1/instances")
                .header("host", "anvil")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let Ok((mut tx, conn)) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let _ = tx.send_request(req).await;
        })
    });
    // Kill as soon as the instance directory exists (bwrap is being set up).
    let t0 = Instant::now();
    let name = loop {
        let found = std::fs::read_dir(bw.instances_dir())
            .ok()
            .and_then(|mut rd| rd.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned());
        if let Some(n) = found {
            break n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no instance dir appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    // Let bwrap get started (its cgroup gets a process) but not become ready, if we can.
    let t1 = Instant::now();
    while bw.cgroup_procs(&name).is_empty() && t1.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(1));
    }
    bw.d.kill9();
    sender.join().unwrap();
    let inflight = bw.cgroup_procs(&name);
    eprintln!("killed the daemon mid-create of {name}; processes in its cgroup: {inflight:?}");
    bw.d.spawn();
    let v = bw.instance(&name);
    assert_eq!(
        v["state"], "destroyed",
        "half-created instance after restart: {v}"
    );
    assert_eq!(v["termination_reason"], "lost-on-restart", "{v}");
    let fp = Footprint {
        name: name.clone(),
        procs: inflight
            .iter()
            .filter_map(|p| start_time(*p).map(|t| (*p, t)))
            .collect(),
        cgroup_dirs: bw.cgroup_dirs(&name),
        instance_dir: bw.instance_dir(&name),
    };
    bw.assert_gone(&fp);
    // The daemon still creates sandboxes.
    let id = bw.create(CLASS);
    assert_eq!(bw.sh(&id, "echo fine"), "fine\n");
    bw.finish();
}

#[test]
fn sigterm_keep_leaves_sandboxes_for_the_next_daemon_and_destroy_removes_them() {
    let Some(mut bw) = Bw::start(policies()) else {
        return;
    };
    set_shutdown(&bw.d, "keep");
    // The running daemon was started with destroy: restart it with keep.
    let st = bw.d.sigterm();
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    bw.d.spawn();
    let a = bw.create(CLASS);
    bw.put_file(&a, "/keep.txt", b"kept");
    let fp = bw.footprint(&a);
    let st = bw.d.sigterm();
    assert!(st.is_some_and(|s| s.success()), "SIGTERM exit: {st:?}");
    assert!(bw.d.log().contains("[daemon].shutdown = keep"));
    assert_eq!(
        procs(&bw, &a),
        {
            let mut p = fp.procs.clone();
            p.sort();
            p
        },
        "sandbox processes survive a SIGTERM with shutdown = keep"
    );
    assert_eq!(bw.mounts_of(&fp.instance_dir).len(), 1);

    // The next daemon (shutdown = destroy) adopts it, then destroys it on its SIGTERM.
    set_shutdown(&bw.d, "destroy");
    bw.d.spawn();
    assert_eq!(bw.instance(&a)["state"], "running");
    assert_eq!(bw.get_file(&a, "/keep.txt").body, b"kept");
    let st = bw.d.sigterm();
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    bw.assert_gone(&fp);
    // Restarting shows it destroyed with reason `shutdown`; finish() checks the host is clean.
    bw.d.spawn();
    let v = bw.instance(&a);
    assert_eq!(v["state"], "destroyed", "{v}");
    assert_eq!(v["termination_reason"], "shutdown", "{v}");
    bw.finish();
}

// ---- Firecracker (test guest) ----

const MARKER: &str = "ANVIL-TEST-GUEST-READY";

/// (pid, start time) of the firecracker processes in the cgroup named `id`.
fn firecracker_procs(id: &str) -> Vec<(i32, u64)> {
    let mut v: Vec<(i32, u64)> = all_pids()
        .into_iter()
        .filter(|p| {
            cgroup_paths(*p)
                .iter()
                .any(|c| c.ends_with(&format!("/{id}")))
        })
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim().starts_with("firecracker"))
        })
        .filter_map(|p| start_time(p).map(|t| (p, t)))
        .collect();
    v.sort();
    v
}

#[test]
fn firecracker_vm_survives_kill9_and_is_adopted() {
    if let Some(r) = fc_skip_reason() {
        eprintln!("SKIP: {r}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (kernel, image) = test_guest_assets(tmp.path());
    let policy = "manifest_version = 1\npolicy_name = \"vm\"\npriority = 10\n[match]\nworkload_class = [\"vm\"]\n[select]\nbackend_priority = [\"firecracker\"]\ntemplates = [\"guest\"]\nfallback_on_missing_hook = \"continue\"\n[pool]\nenabled = false\nreset_mode = \"mm-template\"\n";
    let mut d = Daemon::start(Opts {
        backends: format!("firecracker = \"{FIRECRACKER}\""),
        policies: vec![("vm.toml".into(), policy.into())],
        ..Default::default()
    });
    let t = d.post(
        "/v1/templates",
        json!({"name": "guest", "kernel": kernel, "rootfs_image": image, "ready_marker": MARKER}),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    assert_eq!(t.json()["status"], "ready", "{}", t.text());
    let r = d.post("/v1/instances", json!({"workload_class": "vm"}));
    assert_eq!(r.status, 201, "{}\n{}", r.text(), d.log());
    let vm = r.json()["instance"]["id"].as_str().unwrap().to_string();
    let doomed = d.create(json!({"workload_class": "vm"}));
    let fc_before = firecracker_procs(&vm);
    assert_eq!(
        fc_before.len(),
        1,
        "one firecracker process for {vm}: {fc_before:?}"
    );
    let doomed_fc = firecracker_procs(&doomed);
    assert_eq!(doomed_fc.len(), 1);

    d.kill9();
    assert_eq!(
        firecracker_procs(&vm),
        fc_before,
        "the VM outlives the daemon"
    );
    // One VM dies while the daemon is down.
    unsafe { libc::kill(doomed_fc[0].0, libc::SIGKILL) };
    wait_until("killed firecracker gone", Duration::from_secs(5), || {
        start_time(doomed_fc[0].0) != Some(doomed_fc[0].1)
            || proc_state(doomed_fc[0].0) == Some('Z')
    });
    d.spawn();
    let v = d.instance(&vm);
    assert_eq!(v["state"], "running", "{v}\n{}", d.log());
    assert_eq!(
        firecracker_procs(&vm),
        fc_before,
        "adopted: the same firecracker process"
    );
    let v = d.instance(&doomed);
    assert_eq!(v["state"], "destroyed", "{v}");
    assert_eq!(v["termination_reason"], "lost-on-restart", "{v}");
    assert!(firecracker_procs(&doomed).is_empty());
    // The adopted VM is still controlled: pause/resume through its API socket.
    let r = d.post(&format!("/v1/instances/{vm}/pause"), json!({}));
    assert_eq!(r.status, 200, "pause of adopted VM: {}", r.text());
    let r = d.post(&format!("/v1/instances/{vm}/resume"), json!({}));
    assert_eq!(r.status, 200, "resume of adopted VM: {}", r.text());
    let r = d.post(&format!("/v1/instances/{vm}/destroy"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        firecracker_procs(&vm).is_empty(),
        "firecracker left after destroy"
    );
    let left: Vec<_> = std::fs::read_dir(d.state_dir().join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "instance dirs left: {left:?}");
}

/// `kill -9` right after a reset that took over a warm twin's sandbox: the used sandbox is
/// being retired in the background (or already is). After the restart the instance serves
/// from its new, clean sandbox and nothing of the used one is left, whichever way it went:
/// retired before the kill (`recycled`) or found in state `reset` by recovery and destroyed.
#[test]
fn kill9_right_after_a_swap_reset_leaves_no_used_sandbox_behind() {
    let Some(mut bw) = Bw::start(policies()) else {
        return;
    };
    wait_warm(&bw, 2);
    let id = bw.create(POOLED);
    wait_warm(&bw, 2);
    assert_eq!(bw.put_file(&id, "/root/used", b"by a client").status, 200);
    let used = bw.footprint(&id);
    let warm_before = bw.d.ids("state=warm");
    let r = bw.d.post(&format!("/v1/instances/{id}/reset"), json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["from_pool"], true, "{}", r.text());
    bw.d.kill9();
    bw.d.spawn();

    let v = bw.instance(&id);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["reset_count"], 1, "{v}");
    assert_eq!(bw.get_file(&id, "/root/used").status, 404);
    assert_eq!(bw.sh(&id, "echo fresh"), "fresh\n");
    bw.assert_gone(&used);
    // The twin (one of the warm instances before the reset) carried the used sandbox. Other
    // tombstones can only be pool refills the kill cut short.
    let destroyed: Vec<Value> =
        bw.d.get("/v1/instances?state=destroyed")
            .json()
            .as_array()
            .unwrap()
            .clone();
    let (retired, others): (Vec<Value>, Vec<Value>) = destroyed.into_iter().partition(|v| {
        warm_before
            .iter()
            .any(|w| v["id"].as_str() == Some(w.as_str()))
    });
    assert_eq!(retired.len(), 1, "{retired:?}");
    for o in &others {
        assert_eq!(o["termination_reason"], "lost-on-restart", "{o}");
        assert_eq!(o["reset_count"], 0, "{o}");
    }
    let reason = retired[0]["termination_reason"].as_str().unwrap_or("");
    assert!(
        reason == "recycled" || reason == "lost-on-restart",
        "{retired:?}"
    );
    eprintln!("the used sandbox was {reason} (retired before the kill, or at restart)");
    bw.finish();
}
