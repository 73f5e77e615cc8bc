//! The Firecracker backend against the real `firecracker` binary and the test guest
//! (guest/test-guest): boot, pause/resume, snapshots, concurrent restores, reset, checkpoint,
//! fork, rollback, destroy, adopt. Skips with a reason where Firecracker or KVM is missing.

mod fc_support;

use anvil_backends::firecracker::api::FcApi;
use anvil_backends::{Backend, ExitCause};
use anvil_core::backend::{CheckpointKind, ResetMode};
use fc_support::*;
use std::time::{Duration, Instant};

fn api(rt: &anvil_backends::Runtime) -> FcApi {
    FcApi::new(rt.data["api_socket"].as_str().unwrap())
}

#[tokio::test]
async fn probe_reports_version() {
    require_firecracker!();
    let env = Env::new(false);
    let p = env.backend.probe().await;
    assert!(p.available, "{:?}", p.reason);
    assert_eq!(p.version.as_deref(), Some("1.12.1"));
}

#[tokio::test]
async fn boot_to_marker_in_cgroup_then_destroy_leaves_nothing() {
    require_firecracker!();
    let env = Env::new(false);
    let spec = env.spec("boot", env.template());
    let t0 = Instant::now();
    let rt = env.backend.create(&spec).await.unwrap();
    let boot = t0.elapsed();
    eprintln!("boot to serial marker: {boot:?}");
    assert!(console(&spec).contains(MARKER));
    assert_eq!(rt.data["start_path"], "boot");
    assert_eq!(api(&rt).instance_info().await.unwrap().state, "Running");
    let pid = rt.pid.unwrap();
    assert!(
        in_test_cgroup(pid, &spec.cgroup_name),
        "{}",
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
    );
    let mem_limit = format!(
        "/sys/fs/cgroup/memory/{CGROUP_ROOT}/{}/memory.limit_in_bytes",
        spec.cgroup_name
    );
    if std::path::Path::new(&mem_limit).exists() {
        assert_eq!(
            std::fs::read_to_string(&mem_limit).unwrap().trim(),
            (256u64 << 20).to_string()
        );
    }
    // Its own process group: a signal to the daemon's group does not reach it.
    assert_eq!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
            .unwrap()
            .as_raw(),
        pid
    );
    let ep = env.backend.agent_endpoint(&rt).unwrap();
    assert!(matches!(
        ep,
        anvil_backends::agent::AgentEndpoint::Vsock { port: 1024, .. }
    ));

    env.backend.destroy(&rt).await.unwrap();
    assert_gone(&rt, &spec);
    // Idempotent.
    env.backend.destroy(&rt).await.unwrap();
}

#[tokio::test]
async fn pause_stops_the_guest_and_resume_restarts_it() {
    require_firecracker!();
    let env = Env::new(false);
    let spec = env.spec("pause", env.template());
    let rt = env.backend.create(&spec).await.unwrap();
    tick_above(&spec, 2).await;
    env.backend.pause(&rt).await.unwrap();
    assert_eq!(api(&rt).instance_info().await.unwrap().state, "Paused");
    let frozen = ticks(&spec).last().copied().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // ~7 ticks if it were running
    assert_eq!(
        ticks(&spec).last().copied().unwrap(),
        frozen,
        "guest ticked while paused"
    );
    env.backend.resume(&rt).await.unwrap();
    assert_eq!(api(&rt).instance_info().await.unwrap().state, "Running");
    tick_above(&spec, frozen).await;
    env.backend.destroy(&rt).await.unwrap();
    assert_gone(&rt, &spec);
}

#[tokio::test]
async fn five_concurrent_restores_from_one_snapshot() {
    require_firecracker!();
    let env = Env::new(false);
    let t0 = Instant::now();
    let template = env.snapshot_template().await;
    eprintln!(
        "prepare snapshot (boot + pause + snapshot + stop): {:?}",
        t0.elapsed()
    );
    let snap = template.snapshot_dir.clone().unwrap();
    let mem = std::fs::metadata(snap.join("mem")).unwrap().len();
    assert_eq!(mem, 32 << 20, "memory file holds all guest memory");
    assert!(snap.join("vmstate").exists() && snap.join("snapshot.json").exists());
    assert!(
        !env.dir.path().join("prepare").exists(),
        "snapshot VM work dir left behind"
    );

    let specs: Vec<_> = (0..5)
        .map(|i| env.spec(&format!("r{i}"), template.clone()))
        .collect();
    let t0 = Instant::now();
    let rts = futures::future::join_all(specs.iter().map(|s| env.backend.create(s))).await;
    eprintln!("5 concurrent restores: {:?}", t0.elapsed());
    let rts: Vec<_> = rts.into_iter().map(|r| r.unwrap()).collect();
    for (spec, rt) in specs.iter().zip(&rts) {
        assert_eq!(rt.data["start_path"], "restore");
        assert_eq!(api(rt).instance_info().await.unwrap().state, "Running");
        // Every VMM re-created the vsock socket stored in the snapshot — in its own VM dir.
        assert!(
            spec.instance_dir.join("vm/v.sock").exists(),
            "vsock socket of {} missing",
            spec.id
        );
        // The guest continues from the snapshot: it never prints the boot marker again.
        tick_above(spec, 0).await;
        assert!(!console(spec).contains(MARKER));
    }
    let single = {
        let s = env.spec("r-single", template.clone());
        let t0 = Instant::now();
        let rt = env.backend.create(&s).await.unwrap();
        let d = t0.elapsed();
        env.backend.destroy(&rt).await.unwrap();
        d
    };
    eprintln!("single restore: {single:?}");
    // Re-preparing the snapshot in place must not disturb VMs mapping the old memory file.
    env.snapshot_template().await;
    for (spec, rt) in specs.iter().zip(&rts) {
        let now = ticks(spec).last().copied().unwrap();
        tick_above(spec, now).await;
        assert_eq!(api(rt).instance_info().await.unwrap().state, "Running");
    }
    for (spec, rt) in specs.iter().zip(&rts) {
        env.backend.destroy(rt).await.unwrap();
        assert_gone(rt, spec);
    }
}

#[tokio::test]
async fn reset_by_restore_and_full_recreate() {
    require_firecracker!();
    let env = Env::new(false);
    let template = env.snapshot_template().await;
    let spec = env.spec("reset", template);
    let rt = env.backend.create(&spec).await.unwrap();
    let first = tick_above(&spec, 0).await;
    let later = tick_above(&spec, first + 5).await;

    let t0 = Instant::now();
    let rt2 = env
        .backend
        .reset(&rt, &spec, ResetMode::MmTemplate)
        .await
        .unwrap();
    eprintln!("reset mm-template: {:?}", t0.elapsed());
    assert!(!alive(&rt), "old VMM survived the reset");
    assert_ne!(rt.pid, rt2.pid);
    // Back at the snapshot's counter, not where the old VM was.
    let after = tick_above(&spec, 0).await;
    assert!(
        after < later,
        "tick {after} after reset should restart below {later}"
    );

    let rt3 = env
        .backend
        .reset(&rt2, &spec, ResetMode::FullRecreate)
        .await
        .unwrap();
    assert!(!alive(&rt2));
    assert_eq!(api(&rt3).instance_info().await.unwrap().state, "Running");
    assert!(env
        .backend
        .reset(&rt3, &spec, ResetMode::OverlayfsRollback)
        .await
        .is_err());
    env.backend.destroy(&rt3).await.unwrap();
    assert_gone(&rt3, &spec);
}

#[tokio::test]
async fn checkpoint_then_fork_and_rollback() {
    require_firecracker!();
    let env = Env::new(false);
    let spec = env.spec("parent", env.template());
    let rt = env.backend.create(&spec).await.unwrap();
    tick_above(&spec, 10).await;

    let ckpt = env.dir.path().join("ckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let t0 = Instant::now();
    let out = env.backend.checkpoint(&rt, &ckpt).await.unwrap();
    eprintln!("checkpoint (pause + snapshot + resume): {:?}", t0.elapsed());
    assert_eq!(out.kind, CheckpointKind::Memory);
    assert!(out.size_bytes >= 32 << 20);
    // Still running after the checkpoint.
    assert_eq!(api(&rt).instance_info().await.unwrap().state, "Running");
    let at_ckpt = ticks(&spec).last().copied().unwrap();
    let parent_later = tick_above(&spec, at_ckpt + 10).await;

    let mut child = env.spec("child", env.template());
    child.from_checkpoint = Some(ckpt.clone());
    let t0 = Instant::now();
    let crt = env.backend.create(&child).await.unwrap();
    eprintln!("fork from checkpoint: {:?}", t0.elapsed());
    let first_child = tick_above(&child, 0).await;
    assert!(
        first_child > 10 && first_child <= at_ckpt + 2,
        "child resumed at {first_child}, checkpoint near {at_ckpt}"
    );

    let rt2 = env.backend.rollback(&rt, &spec, &ckpt).await.unwrap();
    assert!(!alive(&rt));
    let back = tick_above(&spec, 0).await;
    assert!(
        back < parent_later,
        "rollback went back: {back} < {parent_later}"
    );

    for (r, s) in [(&rt2, &spec), (&crt, &child)] {
        env.backend.destroy(r).await.unwrap();
        assert_gone(r, s);
    }
    assert!(
        ckpt.join("mem").exists(),
        "destroy must not touch the daemon's checkpoint dir"
    );
}

#[tokio::test]
async fn adopt_and_wait_exit() {
    require_firecracker!();
    let env = Env::new(false);
    let spec = env.spec("adopt", env.template());
    let rt = env.backend.create(&spec).await.unwrap();
    assert!(env.backend.adopt(&rt).await.unwrap());
    // A runtime whose start time does not match is someone else's process: not adopted.
    let mut stale = rt.clone();
    stale.pid_start_time = Some(rt.pid_start_time.unwrap() + 1);
    let waiter = env.backend.wait_exit(&stale);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap(),
        ExitCause::Exited
    );

    // The VM dies behind the daemon's back: wait_exit notices, adopt cleans up.
    let backend = &env.backend;
    let wait = backend.wait_exit(&rt);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rt.pid.unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap(),
        ExitCause::Exited
    );
    assert!(!env.backend.adopt(&rt).await.unwrap());
    assert_gone(&rt, &spec);
}

#[tokio::test]
async fn failed_starts_leave_nothing_behind() {
    require_firecracker!();
    let env = Env::new(false);
    // No kernel.
    let spec = env.spec(
        "nokernel",
        anvil_backends::TemplateFiles {
            id: "x".into(),
            ..Default::default()
        },
    );
    let err = env.backend.create(&spec).await.unwrap_err();
    assert!(err.to_string().contains("no kernel"), "{err}");
    assert!(!spec.instance_dir.exists());

    // A kernel Firecracker rejects: the fault message comes through.
    let bogus = env.dir.path().join("bogus-kernel");
    std::fs::write(&bogus, b"not an elf").unwrap();
    let t = anvil_backends::TemplateFiles {
        id: "bogus".into(),
        kernel: Some(bogus),
        ..Default::default()
    };
    let spec = env.spec("bogus", t);
    let err = env.backend.create(&spec).await.unwrap_err();
    eprintln!("bogus kernel: {err}");
    assert!(
        err.to_string().contains("boot-source")
            || err.to_string().contains("InstanceStart")
            || err.to_string().contains("actions"),
        "{err}"
    );
    assert!(!spec.instance_dir.exists());
    for ctrl in ["memory", "pids"] {
        assert!(!std::path::Path::new(&format!(
            "/sys/fs/cgroup/{ctrl}/{CGROUP_ROOT}/{}",
            spec.cgroup_name
        ))
        .exists());
    }
}

#[tokio::test]
async fn guest_that_never_gets_ready_times_out_and_is_cleaned_up() {
    require_firecracker!();
    let dir = tempfile::Builder::new()
        .prefix("fc")
        .tempdir_in("/tmp")
        .unwrap();
    let env = Env::new(false);
    let mut cfg = env.backend.config().clone();
    cfg.ready_probe = anvil_backends::firecracker::ReadyProbe::SerialMarker("NEVER-PRINTED".into());
    cfg.ready_timeout = Duration::from_millis(500);
    cfg.vm_root = dir.path().join("vmroot");
    let backend = anvil_backends::firecracker::FirecrackerBackend::new(cfg).unwrap();
    let spec = env.spec("never", env.template());
    let err = backend.create(&spec).await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(!spec.instance_dir.exists());
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "fc.sock --id never"])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "firecracker left running: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
}

#[tokio::test]
async fn agent_probe_waits_on_the_vsock_ready_socket_and_cleans_up_on_timeout() {
    require_firecracker!();
    // The test guest has no vsock driver, so its agent never says ready: the backend must
    // have listened on <vsock_uds>_1025, time out, and remove everything.
    let env = Env::new(false);
    let mut cfg = env.backend.config().clone();
    cfg.ready_probe = anvil_backends::firecracker::ReadyProbe::Agent;
    cfg.ready_timeout = Duration::from_millis(500);
    let backend = anvil_backends::firecracker::FirecrackerBackend::new(cfg).unwrap();
    let mut spec = env.spec("agentwait", env.template());
    spec.vm.as_mut().unwrap().enable_vsock = false; // forced on by the Agent probe
    let err = backend.create(&spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("v.sock_1025"), "{msg}");
    assert!(!spec.instance_dir.exists());
    let left = std::process::Command::new("pgrep")
        .args(["-f", "fc.sock --id agentwait"])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "firecracker left running");
    for ctrl in ["memory", "pids"] {
        assert!(!std::path::Path::new(&format!(
            "/sys/fs/cgroup/{ctrl}/{CGROUP_ROOT}/{}",
            spec.cgroup_name
        ))
        .exists());
    }
}
