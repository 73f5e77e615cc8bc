//! Shared helpers for the Firecracker tests: find the binary, build the test guest, make a
//! backend rooted in a temp dir, read the guest's serial ticks, check for leftovers.
#![allow(dead_code)]

use anvil_backends::cgroup::CgroupConfig;
use anvil_backends::firecracker::{FirecrackerBackend, FirecrackerConfig, ReadyProbe};
use anvil_backends::{InstanceSpec, Quota, Runtime, TemplateFiles, VmSpec};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const MARKER: &str = "ANVIL-TEST-GUEST-READY";
pub const CGROUP_ROOT: &str = "anvil-test-fc";

pub fn firecracker_bin() -> PathBuf {
    std::env::var_os("ANVIL_FIRECRACKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/local/bin/firecracker".into())
}

pub fn jailer_bin() -> PathBuf {
    std::env::var_os("ANVIL_JAILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| firecracker_bin().with_file_name("jailer"))
}

/// Why these tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !firecracker_bin().exists() {
        return Some(format!(
            "{} missing (run scripts/install-firecracker.sh or set ANVIL_FIRECRACKER_BIN)",
            firecracker_bin().display()
        ));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm not usable: {e}"));
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (mount namespaces, cgroups)".into());
    }
    None
}

macro_rules! require_firecracker {
    () => {
        if let Some(reason) = fc_support::skip_reason() {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}
pub(crate) use require_firecracker;

/// Builds (cached) and returns the test guest ELF.
pub fn test_guest() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/test-guest/build.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A backend whose every path is inside one temp dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub backend: FirecrackerBackend,
    pub guest: PathBuf,
}

impl Env {
    pub fn new(jailed: bool) -> Env {
        Self::build(jailed, 0)
    }

    /// Plain mode with `spares` spare VMMs (started by `Backend::activate`).
    pub fn with_spares(spares: usize) -> Env {
        Self::build(false, spares)
    }

    fn build(jailed: bool, spares: usize) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("fc")
            .tempdir_in("/tmp")
            .unwrap();
        let cfg = FirecrackerConfig {
            firecracker: firecracker_bin(),
            jailer: Some(jailer_bin()),
            use_jailer: jailed,
            chroot_base: dir.path().join("jail"),
            vm_root: dir.path().join("vmroot"),
            uid: if jailed { 65534 } else { 0 },
            gid: if jailed { 65534 } else { 0 },
            ready_timeout: Duration::from_secs(10),
            ready_probe: ReadyProbe::SerialMarker(MARKER.into()),
            cgroup: Some(CgroupConfig {
                root_name: CGROUP_ROOT.into(),
                base: None,
            }),
            stop_grace: Duration::from_secs(2),
            log_level: "Info".into(),
            spares,
            spares_dir: dir.path().join("spares"),
        };
        let backend = FirecrackerBackend::new(cfg).unwrap();
        Env {
            dir,
            backend,
            guest: test_guest(),
        }
    }

    pub fn template(&self) -> TemplateFiles {
        TemplateFiles {
            id: "test-guest".into(),
            kernel: Some(self.guest.clone()),
            ..Default::default()
        }
    }

    pub fn vm() -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_bytes: 32 << 20,
            boot_args: None,
            enable_vsock: true,
            serial_log: true,
        }
    }

    pub fn spec(&self, id: &str, template: TemplateFiles) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            instance_dir: self.dir.path().join("instances").join(id),
            cgroup_name: format!("fc-{id}"),
            template,
            quota: Quota {
                cpu_shares: Some(512),
                memory_high: None,
                memory_max: Some(256 << 20),
                pids_max: Some(64),
            },
            network: false,
            env: Default::default(),
            vm: Some(Self::vm()),
            from_checkpoint: None,
        }
    }

    /// Boots once and snapshots into `<tmp>/snap`; returns the template pointing at it.
    pub async fn snapshot_template(&self) -> TemplateFiles {
        let out = self.dir.path().join("snap");
        self.backend
            .prepare_snapshot(
                &self.template(),
                &Self::vm(),
                &self.dir.path().join("prepare"),
                &out,
            )
            .await
            .unwrap();
        TemplateFiles {
            snapshot_dir: Some(out),
            ..self.template()
        }
    }
}

pub fn console(spec: &InstanceSpec) -> String {
    std::fs::read_to_string(spec.instance_dir.join("console.log")).unwrap_or_default()
}

/// Tick counters the guest printed, in order.
pub fn ticks(spec: &InstanceSpec) -> Vec<u32> {
    console(spec)
        .lines()
        .filter_map(|l| l.split("ANVIL-TEST-GUEST-TICK ").nth(1))
        .filter_map(|h| u32::from_str_radix(h.trim(), 16).ok())
        .collect()
}

/// Waits (test-only polling) until the guest printed a tick > `above`; returns it.
pub async fn tick_above(spec: &InstanceSpec, above: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(&t) = ticks(spec).last() {
            if t > above {
                return t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no tick above {above}; console: {}",
            console(spec)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn alive(rt: &Runtime) -> bool {
    anvil_backends::procfs::same_process(rt.pid.unwrap(), rt.pid_start_time.unwrap())
}

/// Asserts nothing of `spec`/`rt` is left: process, instance dir, sockets, cgroup dirs.
pub fn assert_gone(rt: &Runtime, spec: &InstanceSpec) {
    assert!(!alive(rt), "firecracker pid {:?} still alive", rt.pid);
    assert!(
        !spec.instance_dir.exists(),
        "instance dir {} left behind",
        spec.instance_dir.display()
    );
    for ctrl in ["memory", "pids", "cpu", "freezer", "unified"] {
        let p = Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join(CGROUP_ROOT)
            .join(&spec.cgroup_name);
        assert!(!p.exists(), "cgroup {} left behind", p.display());
    }
    if let Some(jail) = rt.data.get("jail_dir").and_then(|v| v.as_str()) {
        assert!(!Path::new(jail).exists(), "jail {jail} left behind");
    }
}

/// Cgroup directories that hold `pid` (from /proc/<pid>/cgroup) contain our root name.
pub fn in_test_cgroup(pid: i32, name: &str) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .any(|l| l.contains(&format!("/{CGROUP_ROOT}/{name}")))
}
