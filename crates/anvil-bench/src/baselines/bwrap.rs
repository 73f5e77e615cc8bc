//! Raw bubblewrap: `/bin/true` with the namespaces, root and flags of the bubblewrap backend
//! (crates/anvil-backends/src/bubblewrap/spawn.rs) minus the agent and its run directory.

use crate::daemon::BWRAP;
use crate::error::{Context, Error, Result};
use crate::stats::{run_clients, Budget, Run, Series};
use nix::mount::{MntFlags, MsFlags};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

/// An overlay of the template (lower) with its own upper/work, mounted by the bench;
/// unmounted and removed on drop.
pub struct OverlayRoot {
    dir: tempfile::TempDir,
    pub rootfs: PathBuf,
}

pub fn mount_overlay(lower: &Path, dir: &Path) -> Result<PathBuf> {
    let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
    for d in [&upper, &work, &rootfs] {
        std::fs::create_dir_all(d).ctx(format!("create {}", d.display()))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .ctx(format!("mount overlay on {} ({opts})", rootfs.display()))?;
    Ok(rootfs)
}

pub fn unmount(rootfs: &Path) -> Result<()> {
    nix::mount::umount2(rootfs, MntFlags::empty())
        .or_else(|_| nix::mount::umount2(rootfs, MntFlags::MNT_DETACH))
        .ctx(format!("umount {}", rootfs.display()))
}

impl OverlayRoot {
    pub fn mount(lower: &Path) -> Result<OverlayRoot> {
        let dir = tempfile::Builder::new()
            .prefix("anvil-bench-raw-")
            .tempdir()
            .ctx("create temp dir")?;
        let rootfs = mount_overlay(lower, dir.path())?;
        Ok(OverlayRoot { dir, rootfs })
    }
}

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.rootfs) {
            eprintln!("bench: {e} (left at {})", self.dir.path().display());
        }
    }
}

/// The backend's flags with `/bin/true` in place of the agent.
pub fn args(rootfs: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    for s in [
        "--unshare-all",
        "--as-pid-1",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--bind",
    ] {
        a.push(s.into());
    }
    a.push(rootfs.into());
    for s in [
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--hostname",
        "bench",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--setenv",
        "HOME",
        "/root",
        "--chdir",
        "/",
        "/bin/true",
    ] {
        a.push(s.into());
    }
    a
}

pub async fn spawn_true(args: &[OsString]) -> Result<()> {
    let out = tokio::process::Command::new(BWRAP)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .ctx("spawn bwrap")?;
    if !out.status.success() {
        return Err(Error(format!(
            "bwrap /bin/true: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `bwrap … /bin/true` on one shared overlay root. Series: spawn.
pub async fn raw_true(lower: &Path, clients: usize, budget: Budget) -> Result<Run> {
    let root = OverlayRoot::mount(lower)?;
    let args = Arc::new(args(&root.rootfs));
    run_clients(clients, budget, |_, ticket| {
        let args = args.clone();
        async move {
            let mut s = Series::default();
            for _ in 0..ticket.warmup() {
                spawn_true(&args).await?;
            }
            ticket.begin().await;
            while ticket.next().is_some() {
                let t0 = Instant::now();
                spawn_true(&args).await?;
                s.push("spawn", t0.elapsed());
            }
            Ok(s)
        }
    })
    .await
}

/// Overlay mount + `bwrap … /bin/true` + unmount + remove, per iteration (what a sandbox
/// without a daemon needs at least). Series: total, mount, spawn, teardown.
pub async fn raw_with_overlay(lower: &Path, budget: Budget) -> Result<Run> {
    let base = tempfile::Builder::new()
        .prefix("anvil-bench-raw-")
        .tempdir()
        .ctx("create temp dir")?;
    let base_path = base.path().to_path_buf();
    let lower = lower.to_path_buf();
    run_clients(1, budget, |_, ticket| {
        let base = base_path.clone();
        let lower = lower.clone();
        async move {
            let mut s = Series::default();
            let mut i = 0usize;
            let mut measuring = false;
            loop {
                if i == ticket.warmup() && !measuring {
                    ticket.begin().await;
                    measuring = true;
                }
                if measuring && ticket.next().is_none() {
                    break;
                }
                i += 1;
                let dir = base.join(format!("i{i}"));
                let t0 = Instant::now();
                let rootfs = mount_overlay(&lower, &dir)?;
                let t1 = Instant::now();
                let spawned = spawn_true(&args(&rootfs)).await;
                let t2 = Instant::now();
                let umounted = unmount(&rootfs);
                let removed =
                    std::fs::remove_dir_all(&dir).ctx(format!("remove {}", dir.display()));
                let t3 = Instant::now();
                spawned?;
                umounted?;
                removed?;
                if measuring {
                    s.push("total", t3 - t0);
                    s.push("mount", t1 - t0);
                    s.push("spawn", t2 - t1);
                    s.push("teardown", t3 - t2);
                }
            }
            Ok(s)
        }
    })
    .await
}
