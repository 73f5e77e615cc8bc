//! Spare VMMs (`[pool].vmm_spares`): restores take a pre-started Firecracker process, the
//! spare is replaced in the background, and nothing of a spare outlives its backend —
//! neither after `deactivate` (daemon stop) nor after a crash (the next `activate` sweeps).

mod fc_support;

use anvil_backends::firecracker::api::FcApi;
use anvil_backends::Backend;
use fc_support::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// (dir, pid, start) of every recorded spare in `dir`.
fn spares_in(dir: &Path) -> Vec<(PathBuf, i32, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path().join("spare.json")).ok()?).ok()?;
            Some((e.path(), v["pid"].as_i64()? as i32, v["start"].as_u64()?))
        })
        .collect()
}

async fn wait_spares(dir: &Path, n: usize) -> Vec<(PathBuf, i32, u64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = spares_in(dir);
        if s.len() == n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} spares, want {n}: {s:?}",
            s.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

fn spare_cgroups_left() -> Vec<PathBuf> {
    let mut left = Vec::new();
    for ctrl in ["memory", "pids", "cpu", "freezer", "unified"] {
        let root = Path::new("/sys/fs/cgroup").join(ctrl).join(CGROUP_ROOT);
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("spare-") {
                left.push(e.path());
            }
        }
    }
    left
}

#[tokio::test]
async fn restore_takes_a_spare_which_is_replaced_and_stopped_with_the_backend() {
    require_firecracker!();
    let env = Env::with_spares(1);
    let template = env.snapshot_template().await;
    let spares_dir = env.dir.path().join("spares");
    env.backend.activate().await;
    let first = wait_spares(&spares_dir, 1).await;
    let (_, spare_pid, _) = first[0].clone();
    assert!(
        cgroup_of(spare_pid).contains("/spare-"),
        "{}",
        cgroup_of(spare_pid)
    );

    let spec = env.spec("on-spare", template.clone());
    let rt = env.backend.create(&spec).await.unwrap();
    // The VM runs in the spare's process, with the instance's quota on the spare's cgroup.
    assert_eq!(rt.pid, Some(spare_pid));
    assert_eq!(rt.data["start_path"], "restore");
    assert_eq!(
        FcApi::new(rt.data["api_socket"].as_str().unwrap())
            .instance_info()
            .await
            .unwrap()
            .state,
        "Running"
    );
    assert!(spec.instance_dir.join("vm").join("fc.sock").exists());
    let cg = rt.data["cgroup"]["v1"]["memory"]
        .as_str()
        .map(PathBuf::from);
    if let Some(cg) = cg {
        assert_eq!(
            std::fs::read_to_string(cg.join("memory.limit_in_bytes"))
                .unwrap()
                .trim(),
            (256u64 << 20).to_string()
        );
    }
    // The guest keeps running (its serial ticks advance) after the restore.
    let t = tick_above(&spec, 0).await;
    tick_above(&spec, t).await;

    // A new spare replaces the taken one.
    let second = wait_spares(&spares_dir, 1).await;
    assert_ne!(second[0].1, spare_pid);

    // Destroy removes the VM's process, its (spare) cgroup and the instance directory.
    env.backend.destroy(&rt).await.unwrap();
    assert!(!alive(&rt));
    assert!(!spec.instance_dir.exists());

    // Stopping the backend stops the idle spare and removes its cgroup and directory.
    env.backend.deactivate().await;
    let (dir, pid, start) = second[0].clone();
    assert!(!anvil_backends::procfs::same_process(pid, start));
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(
        spare_cgroups_left().is_empty(),
        "{:?}",
        spare_cgroups_left()
    );
}

#[tokio::test]
async fn a_new_backend_sweeps_spares_a_crashed_one_left() {
    require_firecracker!();
    let env = Env::with_spares(2);
    let spares_dir = env.dir.path().join("spares");
    env.backend.activate().await;
    let left = wait_spares(&spares_dir, 2).await;
    // "Crash": the backend goes away without deactivate; its spares keep running.
    let cfg = env.backend.config().clone();
    drop(env.backend);
    for (_, pid, start) in &left {
        assert!(anvil_backends::procfs::same_process(*pid, *start));
    }
    // The next daemon's backend (no spares wanted) sweeps them on activate.
    let next = anvil_backends::firecracker::FirecrackerBackend::new(
        anvil_backends::firecracker::FirecrackerConfig { spares: 0, ..cfg },
    )
    .unwrap();
    next.activate().await;
    for (dir, pid, start) in &left {
        assert!(
            !anvil_backends::procfs::same_process(*pid, *start),
            "spare {pid} survived"
        );
        assert!(!dir.exists(), "{} left", dir.display());
    }
    assert!(
        spare_cgroups_left().is_empty(),
        "{:?}",
        spare_cgroups_left()
    );
    next.deactivate().await;
}
