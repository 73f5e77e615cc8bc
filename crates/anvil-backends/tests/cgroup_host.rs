//! Real cgroups on this host (root; v1, hybrid or v2): quota, joining at spawn, freeze/thaw,
//! kill_all, oom counter, remove.

use anvil_backends::cgroup::{join_cgroup_raw, Cgroup, CgroupConfig, CgroupManager, Mode};
use anvil_backends::Quota;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn manager() -> Option<CgroupManager> {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: cgroup host tests need root");
        return None;
    }
    let cfg = CgroupConfig {
        root_name: "anvil-test".into(),
        base: None,
    };
    match CgroupManager::new(&cfg) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("SKIP: cgroups unusable here: {e}");
            None
        }
    }
}

/// Kills, removes the cgroup and (if now empty) the test root, even when the test panics.
struct Guard(Cgroup);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill_all();
        let _ = self.0.remove();
        for d in self.0.dirs() {
            if let Some(root) = d.parent() {
                let _ = std::fs::remove_dir(root);
            }
        }
    }
}

fn unique(tag: &str) -> String {
    format!("t-{tag}-{}", std::process::id())
}

fn read(dir: &std::path::Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f))
        .unwrap()
        .trim()
        .to_string()
}

fn spawn_in(cg: &Cgroup, program: &str, args: &[&str]) -> std::process::Child {
    let fds = cg.procs_fds().unwrap();
    let raw = fds.raw();
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: join_cgroup_raw only calls write(2).
    unsafe {
        cmd.pre_exec(move || join_cgroup_raw(&raw));
    }
    let child = cmd.spawn().unwrap();
    drop(fds);
    child
}

#[test]
fn quota_join_freeze_kill_remove() {
    let Some(mgr) = manager() else { return };
    let name = unique("life");
    let quota = Quota {
        cpu_shares: Some(512),
        memory_high: Some(48 << 20),
        memory_max: Some(64 << 20),
        pids_max: Some(33),
    };
    let cg = mgr.create(&name, &quota).unwrap();
    let guard = Guard(cg.clone());
    assert!(!cg.dirs().is_empty());
    if mgr.mode() == Mode::Hybrid {
        assert_eq!(cg.dirs().len(), 5, "hybrid: 4 v1 dirs + the unified one");
    }
    for d in cg.dirs() {
        assert!(d.is_dir(), "{} missing", d.display());
    }
    match mgr.mode() {
        Mode::V1 | Mode::Hybrid => {
            assert_eq!(
                read(&cg.v1["memory"], "memory.limit_in_bytes"),
                (64u64 << 20).to_string()
            );
            assert_eq!(
                read(&cg.v1["memory"], "memory.soft_limit_in_bytes"),
                (48u64 << 20).to_string()
            );
            assert_eq!(read(&cg.v1["memory"], "memory.swappiness"), "0");
            assert_eq!(read(&cg.v1["pids"], "pids.max"), "33");
            assert_eq!(read(&cg.v1["cpu"], "cpu.shares"), "512");
        }
        Mode::V2 => {
            let d = cg.unified.clone().unwrap();
            assert_eq!(read(&d, "memory.max"), (64u64 << 20).to_string());
            assert_eq!(read(&d, "pids.max"), "33");
            assert_eq!(
                read(&d, "cpu.weight"),
                anvil_backends::cgroup::shares_to_weight(512).to_string()
            );
        }
    }

    let mut child = spawn_in(&cg, "sleep", &["60"]);
    let pid = child.id() as i32;
    assert_eq!(cg.pids().unwrap(), vec![pid]);
    let own_cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own_cgroups.contains(&name), "{own_cgroups}");

    cg.freeze().unwrap();
    if let Some(fz) = cg.v1.get("freezer") {
        assert_eq!(read(fz, "freezer.state"), "FROZEN");
    }
    cg.thaw().unwrap();
    if let Some(fz) = cg.v1.get("freezer") {
        assert_eq!(read(fz, "freezer.state"), "THAWED");
    }

    // Killing works on a frozen cgroup too (v1 freezer keeps killed tasks until thawed).
    cg.freeze().unwrap();
    let t = Instant::now();
    cg.kill_all().unwrap();
    eprintln!("kill_all took {:?}", t.elapsed());
    assert!(cg.pids().unwrap().is_empty());
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(cg.oom_kills().unwrap(), 0);

    cg.remove().unwrap();
    for d in cg.dirs() {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    cg.remove().unwrap(); // idempotent
    drop(guard);
}

#[test]
fn kill_all_stops_a_forking_shell() {
    let Some(mgr) = manager() else { return };
    let name = unique("fork");
    let cg = mgr
        .create(
            &name,
            &Quota {
                pids_max: Some(50),
                ..Default::default()
            },
        )
        .unwrap();
    let _guard = Guard(cg.clone());
    let mut child = spawn_in(&cg, "sh", &["-c", "while true; do sleep 30 & done"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.pids().unwrap().len() < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(cg.pids().unwrap().len() >= 10);
    cg.kill_all().unwrap();
    assert!(cg.pids().unwrap().is_empty());
    child.wait().unwrap();
    cg.remove().unwrap();
    assert!(!cg.exists());
}

#[test]
fn oom_kill_is_counted() {
    let Some(mgr) = manager() else { return };
    let name = unique("oom");
    let cg = mgr
        .create(
            &name,
            &Quota {
                memory_max: Some(32 << 20),
                ..Default::default()
            },
        )
        .unwrap();
    let _guard = Guard(cg.clone());
    // dd allocates (and fills) a 256 MiB buffer: far past the limit.
    let mut child = spawn_in(
        &cg,
        "dd",
        &["if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
    );
    let status = child.wait().unwrap();
    assert!(!status.success(), "dd should have been OOM-killed");
    assert!(cg.oom_kills().unwrap() >= 1);
    cg.kill_all().unwrap();
    cg.remove().unwrap();
    assert!(!cg.exists());
}

#[test]
fn reopened_cgroup_sees_the_same_processes() {
    let Some(mgr) = manager() else { return };
    let name = unique("reopen");
    let cg = mgr.create(&name, &Quota::default()).unwrap();
    let _guard = Guard(cg.clone());
    let mut child = spawn_in(&cg, "sleep", &["60"]);
    let persisted = serde_json::to_string(&cg).unwrap();
    let again: Cgroup = serde_json::from_str(&persisted).unwrap();
    assert_eq!(again, mgr.open(&name).unwrap());
    assert_eq!(again.pids().unwrap(), vec![child.id() as i32]);
    again.kill_all().unwrap();
    child.wait().unwrap();
    again.remove().unwrap();
    assert!(!cg.exists());
}
