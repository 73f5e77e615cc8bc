//! The Firecracker backend under the jailer (chroot, uid/gid 65534, its own mount
//! namespace): boot to marker, snapshot, concurrent restores, checkpoint, destroy.

mod fc_support;

use anvil_backends::Backend;
use fc_support::*;
use std::time::Instant;

#[tokio::test]
async fn jailed_boot_snapshot_restore_checkpoint_destroy() {
    require_firecracker!();
    if !jailer_bin().exists() {
        eprintln!("SKIP: {} missing", jailer_bin().display());
        return;
    }
    let env = Env::new(true);
    assert!(env.backend.probe().await.available);

    let spec = env.spec("jboot", env.template());
    let t0 = Instant::now();
    let rt = env.backend.create(&spec).await.unwrap();
    eprintln!("jailed boot to marker: {:?}", t0.elapsed());
    assert!(console(&spec).contains(MARKER));
    let pid = rt.pid.unwrap();
    // The VMM runs as the jail user, chrooted.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    // Its root is the jail (pivot_root): the linked kernel is there, the host's /usr is not.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("kernel").exists() && root.join("fc.sock").exists());
    assert!(!root.join("usr").exists(), "VMM sees the host file system");
    assert!(in_test_cgroup(pid, &spec.cgroup_name));
    env.backend.destroy(&rt).await.unwrap();
    assert_gone(&rt, &spec);

    let t0 = Instant::now();
    let template = env.snapshot_template().await;
    eprintln!("jailed snapshot prepare: {:?}", t0.elapsed());
    let specs: Vec<_> = (0..3)
        .map(|i| env.spec(&format!("jr{i}"), template.clone()))
        .collect();
    let t0 = Instant::now();
    let rts: Vec<_> = futures::future::join_all(specs.iter().map(|s| env.backend.create(s)))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    eprintln!("3 concurrent jailed restores: {:?}", t0.elapsed());
    for (s, r) in specs.iter().zip(&rts) {
        tick_above(s, 0).await;
        assert!(!console(s).contains(MARKER));
        let jail = std::path::PathBuf::from(r.data["jail_dir"].as_str().unwrap());
        assert!(
            jail.join("root/v.sock").exists(),
            "vsock socket in the jail of {}",
            s.id
        );
    }

    let ckpt = env.dir.path().join("jckpt");
    std::fs::create_dir(&ckpt).unwrap();
    let out = env.backend.checkpoint(&rts[0], &ckpt).await.unwrap();
    assert!(out.size_bytes >= 32 << 20);
    let mut child = env.spec("jchild", template.clone());
    child.from_checkpoint = Some(ckpt.clone());
    let crt = env.backend.create(&child).await.unwrap();
    tick_above(&child, 0).await;

    for (s, r) in specs.iter().zip(&rts).chain([(&child, &crt)]) {
        env.backend.destroy(r).await.unwrap();
        assert_gone(r, s);
    }
    let jails = env.dir.path().join("jail/firecracker");
    let left: Vec<_> = std::fs::read_dir(&jails)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "jails left: {left:?}");
}
