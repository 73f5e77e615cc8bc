//! Test harness (not a product backend): boots the real guest image (`guest/image/build.sh`)
//! under QEMU's software emulation (`-M microvm,accel=tcg`) with `vhost-device-vsock`, whose
//! host side is the same Unix-socket vsock protocol as Firecracker's. So the guest kernel,
//! initramfs, rootfs, the agent as pid 1 and anvil's host vsock client are exercised end to end
//! on machines without hardware KVM.
//!
//! Tools are found through (first match wins):
//! - QEMU: `$ANVIL_QEMU`, else `qemu-system-x86_64` on `PATH`;
//! - vhost-device-vsock: `$ANVIL_VHOST_DEVICE_VSOCK`, `$CARGO_INSTALL_ROOT/bin`,
//!   `<repo>/.cache/cargo-bin/bin` (scripts/install-vhost-device-vsock.sh), `PATH`;
//! - the image: built (or found up to date) by `guest/image/build.sh` into
//!   `$ANVIL_GUEST_IMAGE_DIR`, default `<repo>/.anvil/images/guest`.

#![allow(dead_code)] // each test binary uses a different part

use anvil_backends::agent::{AgentClient, AgentEndpoint, AgentError, ReadyInfo, ReadyListener};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The guest's vsock port the agent listens on (Firecracker backend's `AGENT_VSOCK_PORT`).
pub const AGENT_PORT: u32 = anvil_backends::firecracker::AGENT_VSOCK_PORT;
/// The host port the agent's `ready` goes to (`READY_VSOCK_PORT`).
pub const READY_PORT: u32 = anvil_backends::firecracker::READY_VSOCK_PORT;
/// Guest CID on the vhost-user vsock device (any value ≥ 3).
const GUEST_CID: u32 = 3;
/// TCG boots the Debian kernel in ~4-8 s; leave room for a loaded CI machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tools a QEMU test needs, or `None` after printing why the test is skipped.
pub struct Tools {
    pub qemu: PathBuf,
    pub vhost: PathBuf,
}

impl Tools {
    pub fn find(test: &str) -> Option<Tools> {
        let qemu = match std::env::var_os("ANVIL_QEMU") {
            Some(p) => Some(PathBuf::from(p)),
            None => which("qemu-system-x86_64"),
        };
        let Some(qemu) = qemu.filter(|p| p.is_file()) else {
            eprintln!(
                "SKIP: {test}: qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
            );
            return None;
        };
        let Some(vhost) = find_vhost() else {
            eprintln!(
                "SKIP: {test}: vhost-device-vsock not found (scripts/install-vhost-device-vsock.sh)"
            );
            return None;
        };
        Some(Tools { qemu, vhost })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn find_vhost() -> Option<PathBuf> {
    const NAME: &str = "vhost-device-vsock";
    if let Some(p) = std::env::var_os("ANVIL_VHOST_DEVICE_VSOCK") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut candidates = Vec::new();
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT") {
        candidates.push(PathBuf::from(root).join("bin").join(NAME));
    }
    candidates.push(repo_root().join(".cache/cargo-bin/bin").join(NAME));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| which(NAME))
}

/// The four files `guest/image/build.sh` writes.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    /// `uname -r` of the guest kernel.
    pub kernel_version: String,
}

impl GuestImage {
    fn at(dir: &Path) -> Result<GuestImage, String> {
        let image = GuestImage {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio.gz"),
            rootfs: dir.join("rootfs.ext4"),
            kernel_version: std::fs::read_to_string(dir.join("kernel-version.txt"))
                .map_err(|e| format!("{}/kernel-version.txt: {e}", dir.display()))?
                .trim()
                .to_string(),
        };
        for f in [&image.vmlinux, &image.initramfs, &image.rootfs] {
            if !f.is_file() {
                return Err(format!("{} missing", f.display()));
            }
        }
        Ok(image)
    }

    /// Runs `guest/image/build.sh` (a no-op when the image is up to date; a cold build
    /// downloads the kernel package and takes ~30-60 s) once per test process.
    ///
    /// `Ok(None)` (after printing `SKIP`) when this host cannot build it (no apt/dpkg) and no
    /// built image is there; a failing build on a host that can build is an error.
    pub fn build_or_find(test: &str) -> Result<Option<GuestImage>, String> {
        static BUILT: Mutex<Option<GuestImage>> = Mutex::new(None);
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(image) = built.as_ref() {
            return Ok(Some(image.clone()));
        }
        let dir = std::env::var_os("ANVIL_GUEST_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".anvil/images/guest"));
        if which("apt-get").is_none() || which("dpkg-deb").is_none() {
            return match GuestImage::at(&dir) {
                Ok(image) => Ok(Some(image)),
                Err(e) => {
                    eprintln!("SKIP: {test}: no guest image ({e}) and no apt-get to build one");
                    Ok(None)
                }
            };
        }
        let started = Instant::now();
        let script = repo_root().join("guest/image/build.sh");
        let out = Command::new(&script)
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{log}",
                script.display(),
                out.status
            ));
        }
        eprintln!(
            "guest image ready in {:.1} s:\n{log}",
            started.elapsed().as_secs_f64()
        );
        let image = GuestImage::at(&dir)?;
        *built = Some(image.clone());
        Ok(Some(image))
    }
}

/// What to boot; the defaults boot the image as the Firecracker backend would (128 MiB,
/// `VmSpec`'s default).
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub memory_mib: u32,
    /// Attach `rootfs.ext4` as the virtio-blk drive (read-only).
    pub attach_rootfs: bool,
    pub boot_timeout: Duration,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            memory_mib: 128,
            attach_rootfs: true,
            boot_timeout: BOOT_TIMEOUT,
        }
    }
}

/// Why a boot failed, plus what it had started (all of it gone by the time this is returned).
#[derive(Debug)]
pub struct BootFailure {
    /// The reason and the tails of the console, QEMU and vhost-device-vsock logs.
    pub message: String,
    pub dir: PathBuf,
    pub pids: Vec<u32>,
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A running QEMU VM and its vhost-device-vsock. Dropping it kills (SIGKILL) and reaps both
/// and removes the temp dir with the sockets and logs — also when a test panics.
pub struct QemuVm {
    qemu: Option<Child>,
    vhost: Option<Child>,
    dir: Option<tempfile::TempDir>,
    pub uds: PathBuf,
    pub console: PathBuf,
    pub ready: ReadyInfo,
    /// From QEMU's start to the agent's `ready`.
    pub boot_time: Duration,
}

impl QemuVm {
    pub async fn boot(
        tools: &Tools,
        image: &GuestImage,
        opts: &VmOptions,
    ) -> Result<QemuVm, BootFailure> {
        // Short paths: `<dir>/v.sock_1025` must fit a Unix socket address (108 bytes).
        let dir = tempfile::Builder::new()
            .prefix("anvil-qemu.")
            .tempdir_in(std::env::temp_dir())
            .map_err(|e| BootFailure {
                message: format!("temp dir: {e}"),
                dir: std::env::temp_dir(),
                pids: Vec::new(),
            })?;
        let mut vm = QemuVm {
            qemu: None,
            vhost: None,
            uds: dir.path().join("v.sock"),
            console: dir.path().join("console.log"),
            dir: Some(dir),
            ready: ReadyInfo {
                protocol: 0,
                version: String::new(),
                pid: 0,
            },
            boot_time: Duration::ZERO,
        };
        match vm.start(tools, image, opts).await {
            Ok(()) => Ok(vm),
            // `vm` is dropped on return: processes killed, files removed.
            Err(e) => Err(BootFailure {
                message: format!("{e}\n{}", vm.diagnostics()),
                dir: vm.dir().unwrap_or_default(),
                pids: vm.pids(),
            }),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join(name))
            .unwrap_or_default()
    }

    async fn start(
        &mut self,
        tools: &Tools,
        image: &GuestImage,
        opts: &VmOptions,
    ) -> Result<(), String> {
        let vhost_sock = self.path("vhost.sock");
        // Bound before the guest can connect: guest → host port P arrives on `<uds>_P`.
        let ready_path = PathBuf::from(format!("{}_{READY_PORT}", self.uds.display()));
        let ready = ReadyListener::bind(&ready_path).map_err(|e| e.to_string())?;

        let mut vhost = Command::new(&tools.vhost);
        vhost.arg("--vm").arg(format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            vhost_sock.display(),
            self.uds.display()
        ));
        self.vhost = Some(spawn(vhost, &self.path("vhost.log"))?);
        self.wait_for_socket(&vhost_sock).await?;

        let mut qemu = Command::new(&tools.qemu);
        qemu.args(qemu_args(image, opts, &vhost_sock, &self.console));
        let started = Instant::now();
        self.qemu = Some(spawn(qemu, &self.path("qemu.log"))?);

        let ready = tokio::select! {
            r = ready.wait(opts.boot_timeout) => r.map_err(|e: AgentError| e.to_string())?,
            status = self.qemu_exit() => {
                return Err(format!("QEMU exited before the agent was ready ({status})"));
            }
        };
        self.boot_time = started.elapsed();
        self.ready = ready;
        Ok(())
    }

    /// QEMU must not start before vhost-device-vsock listens. A probe connection would be
    /// taken as the front-end, so watch /proc/net/unix for the socket in listening state.
    async fn wait_for_socket(&mut self, path: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(path) {
            if let Some(status) = self
                .vhost
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("vhost-device-vsock exited ({status})"));
            }
            if Instant::now() > deadline {
                return Err(format!("nothing listens on {} after 10 s", path.display()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Resolves when QEMU has exited (a guest panic reboots, and `-no-reboot` exits).
    async fn qemu_exit(&mut self) -> String {
        loop {
            match self.qemu.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => return status.to_string(),
                Some(Err(e)) => return format!("wait failed: {e}"),
                None => return "not started".into(),
                Some(Ok(None)) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn agent(&self) -> AgentClient {
        AgentClient::new(AgentEndpoint::Vsock {
            uds: self.uds.clone(),
            port: AGENT_PORT,
        })
        .with_timeout(Duration::from_secs(30))
    }

    pub fn pids(&self) -> Vec<u32> {
        [&self.qemu, &self.vhost]
            .into_iter()
            .flatten()
            .map(|c| c.id())
            .collect()
    }

    pub fn dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().to_path_buf())
    }

    /// The serial console so far.
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The guest's init and agent lines (a kernel panic's trace would push them out of the
    /// tail), then the tails of the console, QEMU's and vhost-device-vsock's output.
    pub fn diagnostics(&self) -> String {
        let console = self.console_log();
        let ours: Vec<&str> = console
            .lines()
            .filter(|l| l.starts_with("anvil-init") || l.starts_with("anvil-agent"))
            .collect();
        let mut s = format!("--- guest init and agent\n{}\n", ours.join("\n"));
        for (what, path) in [
            ("console", self.console.clone()),
            ("qemu", self.path("qemu.log")),
            ("vhost-device-vsock", self.path("vhost.log")),
        ] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            s.push_str(&format!("--- {what} (last 30 lines)\n{tail}\n"));
        }
        s
    }

    /// Kills and reaps both processes and removes the temp dir.
    pub fn shutdown(&mut self) {
        // QEMU first: vhost-device-vsock then sees its front-end go away.
        for child in [self.qemu.take(), self.vhost.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether a Unix socket bound at `path` is listening (`__SO_ACCEPTCON` in the flags).
fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8
                && f[7] == want
                && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
        })
}

/// Starts `cmd` with stdin closed and stdout+stderr into `log`; the child gets SIGKILL if the
/// test thread dies without running `Drop` (e.g. the harness is killed).
fn spawn(mut cmd: Command, log: &Path) -> Result<Child, String> {
    let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))
}

/// QEMU's command line: microvm under TCG, the kernel + initramfs like Firecracker's
/// boot-source, the rootfs read-only on virtio-blk (virtio-mmio, found through ACPI), the
/// vhost-user vsock device (needs guest memory shared with vhost-device-vsock: a memfd
/// backend with `share=on`), the serial console into a file, and `-no-reboot` so a guest
/// panic (`panic=1`) ends QEMU.
fn qemu_args(
    image: &GuestImage,
    opts: &VmOptions,
    vhost_sock: &Path,
    console: &Path,
) -> Vec<String> {
    // `tsc_early_khz`: under TCG the kernel cannot calibrate the TSC (no PIT speaker gate,
    // HPET or PM timer on microvm) and hangs before /init without a given frequency.
    let append = "console=ttyS0 reboot=k panic=1 pci=off tsc_early_khz=2000000";
    let mut args: Vec<String> = [
        "-M",
        "microvm,accel=tcg,memory-backend=mem",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-m".into(),
        format!("{}M", opts.memory_mib),
        "-object".into(),
        format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            opts.memory_mib
        ),
        "-kernel".into(),
        image.vmlinux.display().to_string(),
        "-initrd".into(),
        image.initramfs.display().to_string(),
        "-append".into(),
        append.into(),
        "-chardev".into(),
        format!("socket,id=vsock,path={}", opt_path(vhost_sock)),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
        "-serial".into(),
        format!("file:{}", opt_path(console)),
    ]);
    if opts.attach_rootfs {
        args.extend([
            "-drive".into(),
            format!(
                "id=rootfs,file={},format=raw,if=none,readonly=on",
                opt_path(&image.rootfs)
            ),
            "-device".into(),
            "virtio-blk-device,drive=rootfs".into(),
        ]);
    }
    args
}

/// A path inside a QEMU `key=value,...` option: commas are doubled.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}
