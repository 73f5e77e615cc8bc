//! Backend selection with real backends (issue: Firecracker, acceptance 3): both backends
//! configured with the policy order reversed, the firecracker binary missing, a firecracker
//! template whose boot snapshot failed. Each case checks the decision's reasons and that the
//! instance really runs under the backend it is recorded under (its process on the host).
mod bwrap_support;
mod common;
use bwrap_support::processes_mentioning;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};

const MARKER: &str = "ANVIL-TEST-GUEST-READY";

fn policy(name: &str, prio: i64, class: &str, order: &str, template: &str) -> (String, String) {
    (
        format!("{name}.toml"),
        format!(
            "manifest_version = 1\npolicy_name = \"{name}\"\npriority = {prio}\n[match]\nworkload_class = [\"{class}\"]\n[select]\nbackend_priority = [{order}]\ntemplates = [\"{template}\"]\nfallback_on_missing_hook = \"continue\"\n[pool]\nenabled = false\nreset_mode = \"full-recreate\"\n"
        ),
    )
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root".into());
    }
    if !Path::new("/usr/bin/bwrap").exists() {
        return Some("bwrap missing (scripts/setup.sh installs it)".into());
    }
    if agent_binary().is_none() {
        return Some("static agent missing (scripts/build-agent.sh)".into());
    }
    None
}

/// The busybox rootfs and the test guest, built by the project's scripts.
fn assets(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let rootfs = dir.join("busybox");
    let out = std::process::Command::new(repo().join("scripts/build-busybox-template.sh"))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (kernel, image) = test_guest_assets(dir);
    (rootfs, kernel, image)
}

/// Names (comm) of the processes in the instance's cgroup (each sandbox has its own, named
/// by its id).
fn cgroup_members(id: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<i32>().is_err() {
            continue;
        }
        let Ok(cg) = std::fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        if cg.lines().any(|l| l.ends_with(&format!("/{id}"))) {
            out.push(
                std::fs::read_to_string(e.path().join("comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            );
        }
    }
    out
}

fn runs_under(_d: &Daemon, id: &str, backend: &str) {
    let procs = cgroup_members(id);
    let (exe, other) = if backend == "firecracker" {
        ("firecracker", "bwrap")
    } else {
        ("bwrap", "firecracker")
    };
    assert!(
        procs.iter().any(|c| c.starts_with(exe)),
        "no {exe} process in the cgroup of {id}: {procs:?}"
    );
    assert!(
        !procs.iter().any(|c| c.starts_with(other)),
        "a {other} process runs for {id}: {procs:?}"
    );
}

#[test]
fn policy_order_decides_between_two_available_backends() {
    if let Some(r) = skip_reason().or_else(fc_skip_reason) {
        eprintln!("SKIP: {r}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rootfs, kernel, image) = assets(tmp.path());
    let d = Daemon::start(Opts {
        backends: format!("bubblewrap = \"/usr/bin/bwrap\"\nfirecracker = \"{FIRECRACKER}\""),
        policies: vec![
            policy(
                "vm-first",
                10,
                "vm-first",
                "\"firecracker\", \"bubblewrap\"",
                "both",
            ),
            policy(
                "ns-first",
                10,
                "ns-first",
                "\"bubblewrap\", \"firecracker\"",
                "both",
            ),
        ],
        ..Default::default()
    });
    let t = d.post(
        "/v1/templates",
        json!({"name": "both", "rootfs_dir": rootfs, "kernel": kernel, "rootfs_image": image, "ready_marker": MARKER}),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    assert_eq!(t.json()["status"], "ready", "{}", t.text());
    assert!(
        t.json()["snapshot_dir"].is_string(),
        "boot snapshot prepared: {}",
        t.text()
    );

    let r = d.post("/v1/instances", json!({"workload_class": "vm-first"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    assert_eq!(b["decision"]["backend"], "firecracker");
    assert_eq!(b["instance"]["backend"], "firecracker");
    assert_eq!(
        b["start_path"], "restore",
        "a VM from its template's boot snapshot is a restore"
    );
    let vm = b["instance"]["id"].as_str().unwrap().to_string();
    runs_under(&d, &vm, "firecracker");

    let r = d.post("/v1/instances", json!({"workload_class": "ns-first"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    assert_eq!(b["decision"]["backend"], "bubblewrap");
    assert_eq!(b["instance"]["backend"], "bubblewrap");
    let ns = b["instance"]["id"].as_str().unwrap().to_string();
    runs_under(&d, &ns, "bubblewrap");

    for id in [&vm, &ns] {
        assert_eq!(
            d.post(&format!("/v1/instances/{id}/destroy"), json!({}))
                .status,
            200
        );
        assert!(cgroup_members(id).is_empty(), "processes left for {id}");
    }
}

#[test]
fn missing_firecracker_binary_falls_back_with_the_reason() {
    if let Some(r) = skip_reason() {
        eprintln!("SKIP: {r}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rootfs, _, _) = assets(tmp.path());
    let d = Daemon::start(Opts {
        backends: "bubblewrap = \"/usr/bin/bwrap\"\nfirecracker = \"/nonexistent/firecracker\""
            .into(),
        policies: vec![policy(
            "vm-first",
            10,
            "vm-first",
            "\"firecracker\", \"bubblewrap\"",
            "busybox",
        )],
        ..Default::default()
    });
    let host = d.get("/v1/host").json();
    let fc = host["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "firecracker")
        .unwrap()
        .clone();
    assert_eq!(fc["available"], false);
    assert_eq!(
        d.post(
            "/v1/templates",
            json!({"name": "busybox", "rootfs_dir": rootfs})
        )
        .status,
        201
    );
    let r = d.post("/v1/instances", json!({"workload_class": "vm-first"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    assert_eq!(b["instance"]["backend"], "bubblewrap");
    let skipped = &b["decision"]["skipped"][0];
    assert_eq!(skipped["backend"], "firecracker");
    let reason = skipped["reason"].as_str().unwrap();
    assert!(
        reason.contains("/nonexistent/firecracker")
            || reason.contains("not found")
            || reason.contains("unavailable"),
        "reason names the cause: {reason}"
    );
    let id = b["instance"]["id"].as_str().unwrap();
    runs_under(&d, id, "bubblewrap");
}

#[test]
fn failed_vm_template_falls_back_to_bubblewrap_with_the_reason() {
    if let Some(r) = skip_reason().or_else(fc_skip_reason) {
        eprintln!("SKIP: {r}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rootfs, _, image) = assets(tmp.path());
    // Not a kernel: the boot snapshot cannot be made.
    let bogus = tmp.path().join("not-a-kernel");
    std::fs::write(&bogus, b"this is not an ELF kernel").unwrap();
    let d = Daemon::start(Opts {
        backends: format!("bubblewrap = \"/usr/bin/bwrap\"\nfirecracker = \"{FIRECRACKER}\""),
        policies: vec![policy(
            "vm-first",
            10,
            "vm-first",
            "\"firecracker\", \"bubblewrap\"",
            "broken",
        )],
        daemon_extra: String::new(),
        extra: "[template]\nready_timeout = \"3s\"\n".into(),
        ..Default::default()
    });
    let t = d.post(
        "/v1/templates",
        json!({"name": "broken", "rootfs_dir": rootfs, "kernel": bogus, "rootfs_image": image}),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    let status = &t.json()["status"];
    assert!(
        status["failed"]["reason"].is_string(),
        "template marked failed with a reason: {}",
        t.text()
    );

    let r = d.post("/v1/instances", json!({"workload_class": "vm-first"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    assert_eq!(b["instance"]["backend"], "bubblewrap");
    let skipped = &b["decision"]["skipped"][0];
    assert_eq!(skipped["backend"], "firecracker");
    assert!(
        skipped["reason"]
            .as_str()
            .unwrap()
            .contains("template `broken` failed"),
        "{}",
        r.text()
    );
    let id = b["instance"]["id"].as_str().unwrap();
    runs_under(&d, id, "bubblewrap");
    // No firecracker process was left by the failed snapshot.
    assert!(processes_mentioning(&d.state_dir().to_string_lossy())
        .iter()
        .all(|(_, c)| !c.starts_with(FIRECRACKER)));
}

/// `[pool].vmm_spares`: the daemon keeps a spare Firecracker process, a VM create restores
/// into it, a replacement starts, and stopping the daemon stops the idle spare and removes
/// its directory (nothing of a spare outlives the daemon).
#[test]
fn spare_vmms_serve_restores_and_stop_with_the_daemon() {
    if let Some(r) = skip_reason().or_else(fc_skip_reason) {
        eprintln!("SKIP: {r}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rootfs, kernel, image) = assets(tmp.path());
    let mut d = Daemon::start(Opts {
        backends: format!("bubblewrap = \"/usr/bin/bwrap\"\nfirecracker = \"{FIRECRACKER}\""),
        policies: vec![policy("vm", 10, "vm", "\"firecracker\"", "guest")],
        extra: "[pool]\nvmm_spares = 1\n".into(),
        ..Default::default()
    });
    let spares_dir = d.state_dir().join("firecracker/spares");
    let t = d.post(
        "/v1/templates",
        json!({"name": "guest", "rootfs_dir": rootfs, "kernel": kernel, "rootfs_image": image, "ready_marker": MARKER}),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    d.wait_for("a spare VMM", std::time::Duration::from_secs(20), || {
        std::fs::read_dir(&spares_dir)
            .map(|rd| rd.flatten().any(|e| e.path().join("spare.json").exists()))
            .unwrap_or(false)
    });

    let r = d.post("/v1/instances", json!({"workload_class": "vm"}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["start_path"], "restore", "{}", r.text());
    let id = r.json()["instance"]["id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["instance"]["state"], "running", "{}", r.text());
    assert!(
        d.log().contains("firecracker VM ready (spare VMM)"),
        "the restore did not use the spare:\n{}",
        d.log()
    );
    // The VM's directory is the spare's, moved into the instance's.
    assert!(d
        .state_dir()
        .join("instances")
        .join(&id)
        .join("vm/fc.sock")
        .exists());
    d.wait_for(
        "a replacement spare",
        std::time::Duration::from_secs(20),
        || {
            std::fs::read_dir(&spares_dir)
                .map(|rd| rd.flatten().any(|e| e.path().join("spare.json").exists()))
                .unwrap_or(false)
        },
    );
    assert_eq!(d.delete(&format!("/v1/instances/{id}")).status, 200);
    assert!(!d.state_dir().join("instances").join(&id).exists());

    let st = d.sigterm();
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", d.log());
    let left: Vec<_> = std::fs::read_dir(&spares_dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "spare dirs left: {left:?}");
    // Every VMM of this daemon (spares too) names its state dir's vm_root on its command line.
    let fcs: Vec<_> = processes_mentioning(&d.state_dir().to_string_lossy())
        .into_iter()
        .filter(|(_, c)| c.contains("firecracker"))
        .collect();
    assert!(fcs.is_empty(), "firecracker processes left: {fcs:?}");
}
