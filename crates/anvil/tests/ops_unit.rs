//! The packaged unit's process settings, applied without systemd (CI has no systemd as pid 1):
//! the daemon runs under dist/anvil.service's `NoNewPrivileges=`, `CapabilityBoundingSet=`,
//! `LimitNOFILE=` and `UMask=` (via setpriv/prlimit) and still serves real bubblewrap
//! sandboxes (create, exec, pause, resume, checkpoint); then `KillMode=process` semantics —
//! SIGTERM to the main pid only, as `systemctl restart` does — leave the sandbox running and
//! the next daemon re-adopts it with its files.
mod ops_support;

use ops_support::OpsDaemon;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const POLICY: &str = r#"
manifest_version = 1
policy_name = "ops-bwrap"
priority = 10
[match]
workload_class = ["ops-bwrap"]
[select]
backend_priority = ["bubblewrap"]
templates = ["busybox"]
[pool]
enabled = false
reset_mode = "overlayfs-rollback"
[quota]
memory_max = "256Mi"
pids_max = 128
"#;

/// Capability numbers (linux/capability.h).
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;

fn has_cap(cap: u32) -> bool {
    let eff = status_line(std::process::id() as i32, "CapEff:");
    u64::from_str_radix(eff.trim_start_matches("CapEff:").trim(), 16)
        .is_ok_and(|m| m & (1 << cap) != 0)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `[Service]` settings of dist/anvil.service, as (key, value) in file order.
fn unit_settings() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("dist/anvil.service")).unwrap();
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn setting(s: &[(String, String)], key: &str) -> String {
    s.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("dist/anvil.service has no {key}="))
}

/// The command prefix that applies the unit's settings: prlimit (LimitNOFILE), setpriv
/// (NoNewPrivileges, CapabilityBoundingSet), then `sh -c 'umask ..; exec "$@"'` (UMask).
fn wrapper(s: &[(String, String)]) -> Vec<String> {
    assert_eq!(setting(s, "KillMode"), "process");
    assert_eq!(setting(s, "NoNewPrivileges"), "yes");
    let caps = setting(s, "CapabilityBoundingSet");
    let dropped = caps
        .strip_prefix('~')
        .expect("CapabilityBoundingSet is a deny list (~CAP_...)");
    let bounding: Vec<String> = dropped
        .split_whitespace()
        .map(|c| {
            format!(
                "-{}",
                c.strip_prefix("CAP_").unwrap_or(c).to_ascii_lowercase()
            )
        })
        .collect();
    assert!(!bounding.is_empty());
    let mut nofile = setting(s, "LimitNOFILE");
    // Raising the hard limit needs CAP_SYS_RESOURCE, which systemd has and a CI container may
    // lack; then apply the highest limit this process may set.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let want: u64 = nofile.parse().expect("LimitNOFILE is a number");
    if want > lim.rlim_max && !has_cap(CAP_SYS_RESOURCE) {
        eprintln!(
            "NOTE: LimitNOFILE={want} needs CAP_SYS_RESOURCE, which this test process lacks; \
             applying the hard limit {} instead",
            lim.rlim_max
        );
        nofile = lim.rlim_max.to_string();
    }
    let umask = setting(s, "UMask");
    vec![
        "prlimit".into(),
        format!("--nofile={nofile}:{nofile}"),
        "--".into(),
        "setpriv".into(),
        "--no-new-privs".into(),
        "--bounding-set".into(),
        bounding.join(","),
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!("umask {umask}; exec \"$@\""),
        "sh".into(),
    ]
}

fn agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ANVIL_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let p = target.join("x86_64-unknown-linux-gnu/release/anvil-agent");
    p.is_file().then_some(p)
}

fn status_line(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn json(d: &OpsDaemon, method: &str, path: &str, body: Option<&str>) -> Value {
    let (st, b) = d.request(method, path, body);
    assert!(
        (200..300).contains(&st),
        "{method} {path}: {st} {b}\n{}",
        d.log()
    );
    serde_json::from_str(&b).unwrap_or(Value::Null)
}

/// The pid of the sandbox's bwrap process (the runtime record in the daemon's store is not
/// in the API, so look for the process whose command line names the instance dir).
fn sandbox_pid(instance_dir: &Path) -> Option<i32> {
    let needle = instance_dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.starts_with("/usr/bin/bwrap") || cmd.starts_with("bwrap"))
            .then_some(())
            .filter(|_| cmd.contains(&needle))
            .map(|_| pid)
    })
}

/// Whatever happens, sandboxes left by a keep-mode daemon are destroyed by a destroy-mode
/// daemon on the same state, and the daemon's root cgroups are removed.
struct Guard {
    d: OpsDaemon,
    destroy_config: String,
    cgroup_root: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.d.stop();
        if std::fs::write(&self.d.config, &self.destroy_config).is_ok() {
            self.d.spawn(&[]);
            if !self.d.try_wait_serving(Duration::from_secs(30)) {
                eprintln!("cleanup daemon did not start:\n{}", self.d.log());
            }
            self.d.stop();
        }
        for h in ["cpu", "freezer", "memory", "pids", "unified", ""] {
            let _ =
                std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(h).join(&self.cgroup_root));
        }
    }
}

#[test]
fn unit_settings_serve_sandboxes_and_keep_them_across_restart() {
    let busybox = repo().join(".anvil/images/busybox");
    let missing: Vec<String> = [
        (
            Path::new("/usr/bin/bwrap").is_file(),
            "/usr/bin/bwrap".to_string(),
        ),
        (
            Path::new("/usr/bin/setpriv").is_file(),
            "setpriv (util-linux)".into(),
        ),
        (
            Path::new("/usr/bin/prlimit").is_file(),
            "prlimit (util-linux)".into(),
        ),
        (
            agent().is_some(),
            "the static agent (scripts/build-agent.sh)".into(),
        ),
        (
            busybox.is_dir(),
            format!("{} (scripts/setup.sh)", busybox.display()),
        ),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect();
    if !missing.is_empty() {
        eprintln!("SKIP: needs {}", missing.join(", "));
        return;
    }
    let settings = unit_settings();
    let wrap = wrapper(&settings);
    let config = |shutdown: &str| {
        format!(
            "[daemon]\nstate_dir = \"state\"\nsocket = \"api.sock\"\nshutdown = \"{shutdown}\"\nagent_binary = \"{}\"\n\n[backends]\nbubblewrap = \"/usr/bin/bwrap\"\n\n[policy]\ndir = \"policies\"\n\n[pool]\nenabled = false\n\n[[template.preload]]\nname = \"busybox\"\nrootfs_dir = \"{}\"\n\n[cgroup]\nroot = \"anvil-ops-unit-{}\"\n",
            agent().unwrap().display(),
            busybox.display(),
            std::process::id()
        )
    };
    let cgroup_root = format!("anvil-ops-unit-{}", std::process::id());
    let mut g = Guard {
        d: OpsDaemon::with_config(&config("keep"), &[("ops.toml", POLICY)]),
        destroy_config: config("destroy"),
        cgroup_root,
    };
    let d = &mut g.d;
    let dir = d.dir.path().to_path_buf();
    d.spawn_wrapped(&wrap, &[]);
    d.wait_serving(Duration::from_secs(60));
    let pid = d.pid();
    assert_eq!(status_line(pid, "NoNewPrivs:"), "NoNewPrivs:\t1");
    let capbnd = status_line(pid, "CapBnd:");
    let mask = u64::from_str_radix(capbnd.trim_start_matches("CapBnd:").trim(), 16).unwrap();
    assert_eq!(mask & (1 << CAP_SYS_MODULE), 0, "{capbnd}");
    assert_ne!(mask & (1 << CAP_SYS_ADMIN), 0, "{capbnd}");

    let c = json(
        d,
        "POST",
        "/v1/instances",
        Some(r#"{"workload_class":"ops-bwrap","id":"ops-unit-1"}"#),
    );
    assert_eq!(c["instance"]["state"], "running", "{c}");
    let x = json(
        d,
        "POST",
        "/v1/instances/ops-unit-1/exec",
        Some(r#"{"cmd":["sh","-c","set -e; echo kept > /root/f; cat /root/f; umask"]}"#),
    );
    assert_eq!(x["exit_code"], 0, "{x}");
    assert_eq!(x["stdout"], "kept\n0022\n", "{x}");
    assert_eq!(
        json(d, "POST", "/v1/instances/ops-unit-1/pause", None)["state"],
        "paused"
    );
    assert_eq!(
        json(d, "POST", "/v1/instances/ops-unit-1/resume", None)["state"],
        "running"
    );
    let ck = json(d, "POST", "/v1/instances/ops-unit-1/checkpoint", None);
    assert!(ck["checkpoint_id"].as_str().is_some(), "{ck}");

    let sandbox = sandbox_pid(&dir.join("state/instances/ops-unit-1"))
        .unwrap_or_else(|| panic!("no bwrap process for ops-unit-1\n{}", d.log()));
    // `systemctl restart` with KillMode=process: SIGTERM to the main pid only.
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        d.log()
    );
    assert!(alive(sandbox), "the sandbox died with the daemon");

    // The next daemon (destroy mode, so it cleans up when the test ends) re-adopts it.
    std::fs::write(&d.config, config("destroy")).unwrap();
    d.spawn_wrapped(&wrap, &[]);
    d.wait_serving(Duration::from_secs(60));
    assert!(d.log().contains("re-adopted instance"), "{}", d.log());
    let i = json(d, "GET", "/v1/instances/ops-unit-1", None);
    assert_eq!(i["state"], "running", "{i}");
    let x = json(
        d,
        "POST",
        "/v1/instances/ops-unit-1/exec",
        Some(r#"{"cmd":["cat","/root/f"]}"#),
    );
    assert_eq!(x["stdout"], "kept\n", "{x}");
    assert_eq!(
        sandbox_pid(&dir.join("state/instances/ops-unit-1")),
        Some(sandbox)
    );

    // Stopping the destroy-mode daemon removes the sandbox and its cgroup.
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        d.log()
    );
    // The adopted bwrap is no child of this daemon: once killed it is a zombie until its
    // reaper (pid 1 or a subreaper) collects it, so a zombie counts as gone.
    let t0 = std::time::Instant::now();
    while alive(sandbox) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "sandbox {sandbox} left behind\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
