//! The v2 writer against a fake tree (files created by the test, like the kernel would).

use super::*;
use std::fs;

const FILES: [&str; 11] = [
    "cgroup.procs",
    "cgroup.freeze",
    "cgroup.events",
    "cgroup.kill",
    "memory.max",
    "memory.high",
    "memory.swap.max",
    "memory.events",
    "pids.max",
    "cpu.weight",
    "cgroup.subtree_control",
];

fn fake_v2() -> (tempfile::TempDir, CgroupManager) {
    let base = tempfile::tempdir().unwrap();
    let b = base.path();
    fs::write(
        b.join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    )
    .unwrap();
    fs::write(b.join("cgroup.subtree_control"), "cpuset\n").unwrap();
    fs::create_dir(b.join("anvil")).unwrap();
    fs::write(
        b.join("anvil/cgroup.controllers"),
        "cpuset cpu memory pids\n",
    )
    .unwrap();
    fs::write(b.join("anvil/cgroup.subtree_control"), "").unwrap();
    let cfg = CgroupConfig {
        root_name: "anvil".into(),
        base: Some(b.to_path_buf()),
    };
    let mgr = CgroupManager::new(&cfg).unwrap();
    (base, mgr)
}

/// Creates the leaf with its interface files, as the kernel does on mkdir.
fn fake_leaf(base: &Path, name: &str) -> PathBuf {
    let dir = base.join("anvil").join(name);
    fs::create_dir(&dir).unwrap();
    for f in FILES {
        fs::write(dir.join(f), "").unwrap();
    }
    fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 1\n").unwrap();
    fs::write(
        dir.join("memory.events"),
        "low 0\nhigh 3\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n",
    )
    .unwrap();
    dir
}

#[test]
fn v2_create_writes_quota_and_enables_controllers() {
    let (base, mgr) = fake_v2();
    assert_eq!(mgr.mode(), Mode::V2);
    let dir = fake_leaf(base.path(), "sbx-1");
    let quota = Quota {
        cpu_shares: Some(1024),
        memory_high: Some(100 << 20),
        memory_max: Some(128 << 20),
        pids_max: Some(64),
    };
    let cg = mgr.create("sbx-1", &quota).unwrap();
    assert_eq!(cg.unified.as_deref(), Some(dir.as_path()));
    assert!(cg.v1.is_empty());
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read("memory.max"), (128u64 << 20).to_string());
    assert_eq!(read("memory.high"), (100u64 << 20).to_string());
    assert_eq!(read("memory.swap.max"), "0");
    assert_eq!(read("pids.max"), "64");
    assert_eq!(read("cpu.weight"), "39");
    // Top level already had cpuset; only what is missing and offered is added.
    assert_eq!(
        fs::read_to_string(base.path().join("cgroup.subtree_control")).unwrap(),
        "+memory +pids +cpu"
    );
    assert_eq!(
        fs::read_to_string(base.path().join("anvil/cgroup.subtree_control")).unwrap(),
        "+memory +pids +cpu"
    );
    assert_eq!(cg.oom_kills().unwrap(), 2);
}

#[test]
fn v2_unset_quota_fields_are_not_written() {
    let (base, mgr) = fake_v2();
    let dir = fake_leaf(base.path(), "sbx-2");
    mgr.create(
        "sbx-2",
        &Quota {
            pids_max: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), "");
    assert_eq!(fs::read_to_string(dir.join("cpu.weight")).unwrap(), "");
    assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "10");
}

#[test]
fn v2_missing_control_file_fails_and_cleans_up() {
    let (base, mgr) = fake_v2();
    // A plain mkdir'ed dir (no interface files) fails the first write; create removes the dir.
    let err = mgr
        .create(
            "sbx-3",
            &Quota {
                memory_max: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("memory.max"), "{err}");
    assert!(!base.path().join("anvil/sbx-3").exists());
}

#[test]
fn v2_freeze_thaw_kill_and_remove() {
    let (base, mgr) = fake_v2();
    let dir = fake_leaf(base.path(), "sbx-4");
    let cg = mgr.create("sbx-4", &Quota::default()).unwrap();
    cg.freeze().unwrap();
    assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
    cg.thaw().unwrap();
    assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "0");
    cg.kill_all().unwrap();
    assert_eq!(fs::read_to_string(dir.join("cgroup.kill")).unwrap(), "1");
    assert_eq!(cg.procs_fds().unwrap().raw().len(), 1);
    // A fake dir has files in it, so rmdir fails with a clear error instead of looping.
    let err = cg.remove().unwrap_err().to_string();
    assert!(err.contains("rmdir"), "{err}");
    for f in fs::read_dir(&dir).unwrap() {
        fs::remove_file(f.unwrap().path()).unwrap();
    }
    cg.remove().unwrap();
    assert!(!dir.exists());
    cg.remove().unwrap();
    cg.kill_all().unwrap();
}

#[test]
fn v2_freeze_times_out_when_never_frozen() {
    let (base, mgr) = fake_v2();
    let dir = fake_leaf(base.path(), "sbx-5");
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    let cg = mgr.open("sbx-5").unwrap();
    let err = cg.freeze().unwrap_err();
    assert!(matches!(err, CgroupError::Timeout(_)), "{err}");
}

#[test]
fn cgroup_round_trips_through_json() {
    let (_base, mgr) = fake_v2();
    let cg = mgr.open("x").unwrap();
    let json = serde_json::to_value(&cg).unwrap();
    assert_eq!(serde_json::from_value::<Cgroup>(json).unwrap(), cg);
}

#[test]
fn names_are_validated() {
    let (_base, mgr) = fake_v2();
    for bad in ["", ".", "..", "a/b", "a b", "x\n"] {
        assert!(
            matches!(mgr.open(bad), Err(CgroupError::InvalidName(_))),
            "{bad:?}"
        );
    }
    assert!(mgr.open("inst-01.a_b").is_ok());
}

#[test]
fn shares_to_weight_matches_oci_conversion() {
    assert_eq!(shares_to_weight(2), 1);
    assert_eq!(shares_to_weight(262_144), 10_000);
    assert_eq!(shares_to_weight(1024), 39);
    assert_eq!(shares_to_weight(0), 1);
    assert_eq!(shares_to_weight(u64::MAX), 10_000);
}

#[test]
fn counters_parse() {
    assert_eq!(
        ops::parse_counter("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n", "oom_kill"),
        Some(7)
    );
    assert_eq!(ops::parse_counter("oom 1\n", "oom_kill"), None);
}

#[test]
fn hybrid_paths_do_not_depend_on_existing_roots() {
    let base = tempfile::tempdir().unwrap();
    for c in ["memory", "pids", "cpu", "freezer", "unified"] {
        fs::create_dir(base.path().join(c)).unwrap();
    }
    fs::write(base.path().join("unified/cgroup.controllers"), "").unwrap();
    let cfg = CgroupConfig {
        root_name: "anvil".into(),
        base: Some(base.path().to_path_buf()),
    };
    let mgr = CgroupManager::new(&cfg).unwrap();
    assert_eq!(mgr.mode(), Mode::Hybrid);
    // Same answer before and after the root dirs exist (a persisted Cgroup must match).
    let before = mgr.open("s1").unwrap();
    mgr.check_usable().unwrap();
    assert_eq!(mgr.open("s1").unwrap(), before);
    assert_eq!(before.dirs().len(), 5);
    assert_eq!(before.unified, Some(base.path().join("unified/anvil/s1")));
    assert_eq!(
        before.memory_dir(),
        Some(base.path().join("memory/anvil/s1").as_path())
    );
}
