//! Raw Firecracker, driven through its API socket by the bench itself (as
//! crates/anvil-backends/tests/fc_support does through the backend): cold boot of the test
//! guest to its serial marker, and snapshot load of the same guest. Same VM shape as the
//! daemon's template (1 vCPU, 128 MiB, read-only rootfs drive, no vsock).

use crate::client::Client;
use crate::daemon::{FIRECRACKER, MARKER};
use crate::error::{Context, Error, Result};
use crate::stats::{run_clients, Budget, Run, Series};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const LIMIT: Duration = Duration::from_secs(10);

/// One firecracker process; killed and reaped on `stop` (and on drop, by tokio).
struct Vmm {
    child: tokio::process::Child,
    api: Client,
    sock: PathBuf,
    log: PathBuf,
    marker: Option<oneshot::Receiver<()>>,
    /// The last bytes of the console, for error messages.
    tail: Arc<Mutex<Vec<u8>>>,
}

impl Vmm {
    /// Starts firecracker and waits until its API socket accepts. The serial console
    /// (stdout) is drained by a task that reports the ready marker.
    async fn start(dir: &Path, name: &str) -> Result<Vmm> {
        let sock = dir.join(format!("{name}.sock"));
        // Firecracker logs to stdout by default, interleaved with the serial console (it can
        // split the marker); its log goes to a file instead, as in the daemon.
        let log = dir.join(format!("{name}.log"));
        std::fs::File::create(&log).ctx(format!("create {}", log.display()))?;
        let mut child = tokio::process::Command::new(FIRECRACKER)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(name)
            .arg("--log-path")
            .arg(&log)
            .args(["--level", "Warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ctx(format!("spawn {FIRECRACKER}"))?;
        let mut out = child.stdout.take().ctx("firecracker stdout")?;
        let (tx, rx) = oneshot::channel();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let tail_w = tail.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut seen = Vec::<u8>::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match out.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        if let Ok(mut t) = tail_w.lock() {
                            t.extend_from_slice(format!("[console read error: {e}]").as_bytes());
                        }
                        break;
                    }
                };
                if let Ok(mut t) = tail_w.lock() {
                    t.extend_from_slice(&buf[..n]);
                    let excess = t.len().saturating_sub(2048);
                    t.drain(..excess);
                }
                if tx.is_some() {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                        seen = Vec::new();
                    }
                }
            }
        });
        // The socket appears after bind and accepts after listen: short bounded retries.
        let t0 = Instant::now();
        let api = loop {
            if sock.exists() {
                if let Ok(c) = Client::connect(&sock, "localhost").await {
                    break c;
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Error(format!("firecracker exited at start: {st}")));
            }
            if t0.elapsed() > LIMIT {
                return Err(Error(
                    "firecracker API socket did not appear in 10 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        Ok(Vmm {
            child,
            api,
            sock,
            log,
            marker: Some(rx),
            tail,
        })
    }

    async fn put(&mut self, path: &str, body: serde_json::Value) -> Result<()> {
        self.api
            .put_json(path, &body)
            .await?
            .expect(&format!("firecracker PUT {path}"), &[200, 204])?;
        Ok(())
    }

    async fn boot(&mut self, kernel: &Path, image: &Path) -> Result<()> {
        self.put(
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        )
        .await?;
        self.put(
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": BOOT_ARGS}),
        )
        .await?;
        self.put(
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": image, "is_root_device": true, "is_read_only": true}),
        )
        .await?;
        self.put("/actions", json!({"action_type": "InstanceStart"}))
            .await?;
        let rx = self.marker.take().ctx("marker already consumed")?;
        let seen = tokio::time::timeout(LIMIT, rx).await;
        match seen {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error(format!(
                "test guest marker not seen within {LIMIT:?}; console: {}",
                self.console_tail()
            ))),
        }
    }

    fn console_tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| String::from_utf8_lossy(&t).into_owned())
            .unwrap_or_default()
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(LIMIT, self.child.wait()).await;
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A full snapshot of the booted test guest (vmstate, mem) in `dir`.
pub struct Snapshot {
    pub vmstate: PathBuf,
    pub mem: PathBuf,
}

pub async fn make_snapshot(dir: &Path, kernel: &Path, image: &Path) -> Result<Snapshot> {
    let mut vm = Vmm::start(dir, "bench-snap").await?;
    let snap = Snapshot {
        vmstate: dir.join("vmstate"),
        mem: dir.join("mem"),
    };
    let made = async {
        vm.boot(kernel, image).await?;
        vm.api
            .patch("/vm", &json!({"state": "Paused"}))
            .await?
            .expect("firecracker pause", &[204])?;
        vm.put(
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": snap.vmstate, "mem_file_path": snap.mem}),
        )
        .await
    }
    .await;
    vm.stop().await;
    made.map(|_| snap)
}

/// Cold boot to the serial marker. Series: boot (spawn → marker).
pub async fn raw_boot(dir: &Path, kernel: &Path, image: &Path, budget: Budget) -> Result<Run> {
    let (dir, kernel, image) = (dir.to_path_buf(), kernel.to_path_buf(), image.to_path_buf());
    run_clients(1, budget, |_, ticket| {
        let (dir, kernel, image) = (dir.clone(), kernel.clone(), image.clone());
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
                let t0 = Instant::now();
                let mut vm = Vmm::start(&dir, &format!("bench-boot-{i}")).await?;
                let booted = vm.boot(&kernel, &image).await;
                let took = t0.elapsed();
                vm.stop().await;
                booted?;
                if measuring {
                    s.push("boot", took);
                }
            }
            Ok(s)
        }
    })
    .await
}

/// Snapshot load with resume (spawn → API socket → PUT /snapshot/load answered).
/// Series: load.
pub async fn raw_load(dir: &Path, snap: &Snapshot, budget: Budget) -> Result<Run> {
    let dir = dir.to_path_buf();
    let (vmstate, mem) = (snap.vmstate.clone(), snap.mem.clone());
    run_clients(1, budget, |_, ticket| {
        let (dir, vmstate, mem) = (dir.clone(), vmstate.clone(), mem.clone());
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
                let t0 = Instant::now();
                let mut vm = Vmm::start(&dir, &format!("bench-load-{i}")).await?;
                let loaded = vm
                    .put(
                        "/snapshot/load",
                        json!({"snapshot_path": vmstate,
                               "mem_backend": {"backend_type": "File", "backend_path": mem},
                               "resume_vm": true}),
                    )
                    .await;
                let took = t0.elapsed();
                vm.stop().await;
                loaded?;
                if measuring {
                    s.push("load", took);
                }
            }
            Ok(s)
        }
    })
    .await
}
