//! The daemon under test: started by the bench from a temporary config (like the test
//! harness), or an existing one reached through `--socket`. Also the assets both the daemon
//! and the baselines use (busybox rootfs, test guest) and the RSS probe.

use crate::client::Client;
use crate::error::{Context, Error, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const FIRECRACKER: &str = "/usr/local/bin/firecracker";
pub const BWRAP: &str = "/usr/bin/bwrap";
pub const MARKER: &str = "ANVIL-TEST-GUEST-READY";

/// Workload classes the bench uses; `policies()` defines them.
pub const CLASS_COLD: &str = "bench-cold";
pub const CLASS_RECREATE: &str = "bench-recreate";
pub const CLASS_WARM: &str = "bench-warm";
pub const CLASS_VM: &str = "bench-vm";

fn policy(class: &str, backend: &str, template: &str, reset: &str, extra: &str) -> String {
    format!(
        "manifest_version = 1\npolicy_name = \"{class}\"\npriority = 50\n[match]\nworkload_class = [\"{class}\"]\n[select]\nbackend_priority = [\"{backend}\"]\ntemplates = [\"{template}\"]\nfallback_on_missing_hook = \"continue\"\n[pool]\nenabled = false\nreset_mode = \"{reset}\"\n{extra}"
    )
}

/// The policies of the pool-less classes (file name, TOML). The warm class is added later
/// (`warm_policy`) so the idle RSS is measured without a pool.
pub fn policies(with_vm: bool) -> Vec<(String, String)> {
    let mut v = vec![
        (
            format!("{CLASS_COLD}.toml"),
            policy(
                CLASS_COLD,
                "bubblewrap",
                "busybox",
                "overlayfs-rollback",
                "",
            ),
        ),
        (
            format!("{CLASS_RECREATE}.toml"),
            policy(CLASS_RECREATE, "bubblewrap", "busybox", "full-recreate", ""),
        ),
    ];
    if with_vm {
        v.push((
            format!("{CLASS_VM}.toml"),
            policy(
                CLASS_VM,
                "firecracker",
                "test-guest",
                "mm-template",
                "[vm]\nvcpus = 1\nmemory = \"128Mi\"\n[backend.firecracker]\nenable_vsock = false\nserial_log = false\n",
            ),
        ));
    }
    v
}

/// The pooled class: `target` warm sandboxes, room for every client's returns.
pub fn warm_policy(target: u32) -> (String, String) {
    let max = target * 2 + 2;
    let text = format!(
        "manifest_version = 1\npolicy_name = \"{CLASS_WARM}\"\npriority = 50\n[match]\nworkload_class = [\"{CLASS_WARM}\"]\n[select]\nbackend_priority = [\"bubblewrap\"]\ntemplates = [\"busybox\"]\nfallback_on_missing_hook = \"continue\"\n[pool]\nenabled = true\nmin = {target}\ntarget = {target}\nmax = {max}\nwarm_ttl = \"30m\"\nreset_mode = \"overlayfs-rollback\"\n"
    );
    (format!("{CLASS_WARM}.toml"), text)
}

/// Whether Firecracker can run here, or why not.
pub fn firecracker_missing() -> Option<String> {
    if !Path::new(FIRECRACKER).is_file() {
        return Some(format!(
            "{FIRECRACKER} missing (scripts/install-firecracker.sh)"
        ));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm not usable: {e}"));
    }
    None
}

/// Paths of the things the bench needs built.
pub struct Assets {
    pub anvil: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    /// The busybox rootfs (scripts/build-busybox-template.sh).
    pub rootfs: PathBuf,
    /// The Firecracker test guest ELF and a small disk image for the VM template.
    pub guest: Option<(PathBuf, PathBuf)>,
}

fn run_script(script: &Path, args: &[&Path]) -> Result<String> {
    let out = Command::new(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ctx(format!("run {}", script.display()))?;
    if !out.status.success() {
        return Err(Error(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Assets {
    /// Builds what is missing into `<repo>/.cache/bench` (cached across runs).
    pub fn prepare(
        repo: &Path,
        anvil: Option<PathBuf>,
        agent: Option<PathBuf>,
        with_vm: bool,
    ) -> Result<Assets> {
        let cache = repo.join(".cache/bench");
        std::fs::create_dir_all(&cache).ctx(format!("create {}", cache.display()))?;
        let rootfs = cache.join("busybox");
        if !rootfs.join("bin/busybox").is_file() {
            run_script(&repo.join("scripts/build-busybox-template.sh"), &[&rootfs])?;
        }
        let guest = if with_vm {
            let kernel = PathBuf::from(run_script(
                &repo.join("guest/test-guest/build.sh"),
                &[&cache.join("test-guest")],
            )?);
            let image = cache.join("test-guest-disk.img");
            if !image.is_file() {
                std::fs::write(&image, vec![0u8; 1 << 20])
                    .ctx(format!("write {}", image.display()))?;
            }
            Some((kernel, image))
        } else {
            None
        };
        Ok(Assets {
            anvil,
            agent,
            rootfs,
            guest,
        })
    }
}

/// The daemon process the bench started (None when connected to an existing one).
pub struct Daemon {
    pub socket: PathBuf,
    pub pid: Option<u32>,
    child: Option<Child>,
    pub dir: Option<tempfile::TempDir>,
    cgroup_root: Option<String>,
}

impl Daemon {
    /// Connects to a running daemon; its pid comes from the socket's peer credentials.
    pub fn existing(socket: PathBuf) -> Result<Daemon> {
        let pid = peer_pid(&socket)?;
        Ok(Daemon {
            socket,
            pid,
            child: None,
            dir: None,
            cgroup_root: None,
        })
    }

    /// Writes a config into a temp dir and starts `anvil daemon start` on it.
    pub fn start(assets: &Assets, with_vm: bool, vmm_spares: u32) -> Result<Daemon> {
        let anvil = assets
            .anvil
            .clone()
            .ctx("no anvil binary: pass --anvil PATH or build it next to anvil-bench")?;
        let agent = assets
            .agent
            .clone()
            .ctx("no static agent: run scripts/build-agent.sh or pass --agent PATH")?;
        let dir = tempfile::Builder::new()
            .prefix("anvil-bench-")
            .tempdir()
            .ctx("create temp dir")?;
        let pdir = dir.path().join("policies");
        std::fs::create_dir_all(&pdir).ctx("create policies dir")?;
        for (name, text) in policies(with_vm) {
            std::fs::write(pdir.join(&name), text).ctx(format!("write policy {name}"))?;
        }
        let cgroup_root = format!("anvil-bench-{}", std::process::id());
        let fc = if with_vm {
            format!("firecracker = \"{FIRECRACKER}\"\n\n[pool]\nvmm_spares = {vmm_spares}\n")
        } else {
            String::new()
        };
        let cfg = format!(
            "[daemon]\nstate_dir = \"state\"\nsocket = \"api.sock\"\nshutdown = \"destroy\"\nmax_instances = 512\nagent_binary = \"{}\"\n\n[backends]\nbubblewrap = \"{BWRAP}\"\n{fc}\n[policy]\ndir = \"policies\"\n\n[cgroup]\nroot = \"{cgroup_root}\"\n\n[limits]\nmax_concurrent_creates = 16\n",
            agent.display()
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, cfg).ctx("write config")?;
        let log = std::fs::File::create(dir.path().join("daemon.log")).ctx("create daemon log")?;
        let child = Command::new(&anvil)
            .args(["daemon", "start", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ctx("dup log")?)
            .stderr(log)
            .spawn()
            .ctx(format!("start {}", anvil.display()))?;
        let pid = child.id();
        let mut d = Daemon {
            socket: dir.path().join("api.sock"),
            pid: Some(pid),
            child: Some(child),
            dir: Some(dir),
            cgroup_root: Some(cgroup_root),
        };
        d.wait_healthy()?;
        Ok(d)
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx("runtime")?;
        loop {
            let ok = rt.block_on(async {
                match Client::connect(&self.socket, "anvil").await {
                    Ok(mut c) => c.get("/v1/health").await.is_ok_and(|r| r.status == 200),
                    Err(_) => false,
                }
            });
            if ok {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(Error(format!(
                        "daemon exited with {st} during start:\n{}",
                        self.log_tail()
                    )));
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(Error(format!(
                    "daemon did not answer within 30 s:\n{}",
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn log_text(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("daemon.log")).ok())
            .unwrap_or_default()
    }

    pub fn policies_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("policies"))
    }

    /// Resident set size of the daemon process (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid.ctx("daemon pid unknown")?;
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).ctx("read daemon status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ctx("no VmRSS in /proc/<pid>/status")
    }

    /// SIGTERM (the config says `shutdown = "destroy"`: every sandbox goes), wait, then remove
    /// the cgroup root directories the daemon created.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if t0.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    eprintln!("bench: daemon did not stop within 60 s; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
        if let Some(root) = &self.cgroup_root {
            for ctrl in ["memory", "pids", "cpu", "freezer", "unified", ""] {
                let p = Path::new("/sys/fs/cgroup").join(ctrl).join(root);
                // Only empty directories can go; a leftover sandbox cgroup stays visible.
                let _ = std::fs::remove_dir(&p);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pid of the process listening on `socket` (SO_PEERCRED).
fn peer_pid(socket: &Path) -> Result<Option<u32>> {
    let s = std::os::unix::net::UnixStream::connect(socket)
        .ctx(format!("connect {}", socket.display()))?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .ctx("SO_PEERCRED")?;
    Ok(u32::try_from(cred.pid()).ok().filter(|p| *p > 0))
}

/// Imports the busybox template (and the VM test guest) into the daemon; returns the VM
/// template import time (boot + readiness + snapshot) when one was imported.
pub async fn import_templates(c: &mut Client, assets: &Assets) -> Result<Option<Duration>> {
    let have = c
        .get("/v1/templates")
        .await?
        .expect("list templates", &[200])?;
    let names: Vec<String> = have
        .json()?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if !names.iter().any(|n| n == "busybox") {
        c.post(
            "/v1/templates",
            &json!({"name": "busybox", "rootfs_dir": assets.rootfs}),
        )
        .await?
        .expect("import busybox template", &[201])?;
    }
    let Some((kernel, image)) = &assets.guest else {
        return Ok(None);
    };
    if names.iter().any(|n| n == "test-guest") {
        return Ok(None);
    }
    let t0 = Instant::now();
    let r = c
        .post(
            "/v1/templates",
            &json!({"name": "test-guest", "kernel": kernel, "rootfs_image": image,
                    "ready_marker": MARKER, "memory_mib": 128, "vcpus": 1,
                    "backend_hint": "firecracker"}),
        )
        .await?
        .expect("import test-guest template", &[201])?;
    let took = t0.elapsed();
    let v = r.json()?;
    if v["status"] != "ready" || !v["snapshot_dir"].is_string() {
        return Err(Error(format!(
            "test-guest template has no boot snapshot: {v}"
        )));
    }
    Ok(Some(took))
}
