//! Overlay mounts on this host (root): writes land in upper, whiteouts and opaque dirs
//! survive `copy_tree`, and a new overlay over the copied upper shows the same tree.

use anvil_backends::mount::{
    copy_tree, dir_size, is_mounted, mount_overlay, mounts_under, unmount,
};
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

struct Unmount<'a>(Vec<&'a Path>);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = unmount(p);
        }
    }
}

#[test]
fn overlay_copy_preserves_whiteouts_and_opaque_dirs() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: overlay mounts need root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s);
    for s in [
        "lower/etc",
        "lower/data",
        "upper",
        "work",
        "merged",
        "upper2",
        "work2",
        "merged2",
    ] {
        fs::create_dir_all(p(s)).unwrap();
    }
    fs::write(p("lower/etc/keep"), "keep").unwrap();
    fs::write(p("lower/etc/gone"), "gone").unwrap();
    fs::write(p("lower/data/old"), "old").unwrap();
    let (m1, m2) = (p("merged"), p("merged2"));
    let _guard = Unmount(vec![&m1, &m2]);

    mount_overlay(&p("lower"), &p("upper"), &p("work"), &m1).unwrap();
    assert!(is_mounted(&m1).unwrap());
    fs::write(m1.join("etc/new"), "new").unwrap();
    fs::remove_file(m1.join("etc/gone")).unwrap();
    fs::remove_dir_all(m1.join("data")).unwrap();
    fs::create_dir(m1.join("data")).unwrap(); // opaque now
    fs::write(m1.join("data/fresh"), "fresh").unwrap();
    assert_eq!(
        fs::read_to_string(p("lower/etc/gone")).unwrap(),
        "gone",
        "lower must stay untouched"
    );
    unmount(&m1).unwrap();
    assert!(!is_mounted(&m1).unwrap());
    unmount(&m1).unwrap(); // idempotent

    let wh = fs::symlink_metadata(p("upper/etc/gone")).unwrap();
    assert!(
        wh.file_type().is_char_device(),
        "whiteout expected in upper"
    );

    copy_tree(&p("upper"), &p("upper2")).unwrap();
    let wh2 = fs::symlink_metadata(p("upper2/etc/gone")).unwrap();
    assert!(
        wh2.file_type().is_char_device(),
        "whiteout lost by copy_tree"
    );
    assert!(dir_size(&p("upper2")).unwrap() >= 8);

    mount_overlay(&p("lower"), &p("upper2"), &p("work2"), &m2).unwrap();
    assert_eq!(fs::read_to_string(m2.join("etc/new")).unwrap(), "new");
    assert_eq!(fs::read_to_string(m2.join("etc/keep")).unwrap(), "keep");
    assert!(!m2.join("etc/gone").exists(), "whiteout not honoured");
    assert!(
        !m2.join("data/old").exists(),
        "opaque dir xattr lost by copy_tree"
    );
    assert_eq!(fs::read_to_string(m2.join("data/fresh")).unwrap(), "fresh");
    assert_eq!(mounts_under(d.path()).unwrap().len(), 1);
    unmount(&m2).unwrap();
    assert!(mounts_under(d.path()).unwrap().is_empty());
}

#[test]
fn stacked_mounts_are_all_unmounted() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: overlay mounts need root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s);
    for s in ["lower", "u1", "w1", "u2", "w2", "merged"] {
        fs::create_dir_all(p(s)).unwrap();
    }
    let m = p("merged");
    let _guard = Unmount(vec![&m, &m]);
    mount_overlay(&p("lower"), &p("u1"), &p("w1"), &m).unwrap();
    mount_overlay(&p("lower"), &p("u2"), &p("w2"), &m).unwrap();
    assert_eq!(mounts_under(d.path()).unwrap().len(), 2);
    unmount(&m).unwrap();
    assert!(mounts_under(d.path()).unwrap().is_empty());
}
