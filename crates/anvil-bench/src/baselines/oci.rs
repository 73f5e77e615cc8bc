//! What a user might pick instead: `runsc --network=none do /bin/true` (gVisor) and
//! `runc run` of an OCI bundle over the same busybox rootfs, when they are installed.

use crate::error::{Context, Error, Result};
use crate::stats::{run_clients, Budget, Run, Series};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

/// The first `name` on $PATH (plus /usr/sbin and /usr/local/sbin), if any.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(name);
        if !dir.is_empty() && p.is_file() {
            return Some(p);
        }
    }
    None
}

async fn run_ok(cmd: &mut tokio::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .ctx(format!("spawn {what}"))?;
    if !out.status.success() {
        return Err(Error(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `runsc --network=none do /bin/true`. Series: run.
pub async fn runsc(bin: &Path, budget: Budget) -> Result<Run> {
    let bin = bin.to_path_buf();
    run_clients(1, budget, |_, ticket| {
        let bin = bin.clone();
        async move {
            let mut s = Series::default();
            let cmd = || {
                let mut c = tokio::process::Command::new(&bin);
                c.args(["--network=none", "do", "/bin/true"]);
                c
            };
            for _ in 0..ticket.warmup() {
                run_ok(&mut cmd(), "runsc do /bin/true").await?;
            }
            ticket.begin().await;
            while ticket.next().is_some() {
                let t0 = Instant::now();
                run_ok(&mut cmd(), "runsc do /bin/true").await?;
                s.push("run", t0.elapsed());
            }
            Ok(s)
        }
    })
    .await
}

/// A bundle whose config comes from `runc spec`, with the busybox rootfs read-only and
/// `/bin/true` as the process.
async fn runc_bundle(bin: &Path, dir: &Path, rootfs: &Path) -> Result<()> {
    run_ok(
        tokio::process::Command::new(bin)
            .args(["spec", "--bundle"])
            .arg(dir),
        "runc spec",
    )
    .await?;
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).ctx("read runc config.json")?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).ctx("parse runc config.json")?;
    cfg["root"] = serde_json::json!({"path": rootfs, "readonly": true});
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(&cfg_path, cfg.to_string()).ctx("write runc config.json")?;
    Ok(())
}

/// `runc run` (create + start + wait + delete) of the bundle. Series: run.
pub async fn runc(bin: &Path, rootfs: &Path, budget: Budget) -> Result<Run> {
    let dir = tempfile::Builder::new()
        .prefix("anvil-bench-runc-")
        .tempdir()
        .ctx("create temp dir")?;
    let bundle = dir.path().join("bundle");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&bundle).ctx("create bundle dir")?;
    runc_bundle(bin, &bundle, rootfs).await?;
    let bin = bin.to_path_buf();
    let tag = std::process::id();
    run_clients(1, budget, |_, ticket| {
        let (bin, bundle, state) = (bin.clone(), bundle.clone(), state.clone());
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
                let id = format!("anvil-bench-{tag}-{i}");
                let t0 = Instant::now();
                let ran = run_ok(
                    tokio::process::Command::new(&bin)
                        .arg("--root")
                        .arg(&state)
                        .args(["run", "--bundle"])
                        .arg(&bundle)
                        .arg(&id),
                    "runc run",
                )
                .await;
                let took = t0.elapsed();
                // `run` deletes the container when it exits; make sure nothing is left.
                let _ = tokio::process::Command::new(&bin)
                    .arg("--root")
                    .arg(&state)
                    .args(["delete", "--force", &id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
                ran?;
                if measuring {
                    s.push("run", took);
                }
            }
            Ok(s)
        }
    })
    .await
}
