//! `anvil daemon doctor`: checks everything an operator would check, prints a table, and
//! returns false (exit non-zero) naming what is wrong.

use crate::manager::recovery_helpers::{build_registry, find_agent};
use crate::policies::load_policy_dir;
use anvil_core::backend::BackendKind;
use anvil_core::config::Config;
use std::path::Path;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
    Info,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Info => "info",
        }
    }
}

struct Report {
    rows: Vec<(String, Status, String)>,
}

impl Report {
    fn add(&mut self, check: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.rows.push((check.into(), status, detail.into()));
    }

    fn print(&self) -> bool {
        let w = self
            .rows
            .iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(5)
            .max(5);
        println!("{:<w$}  {:<6}  DETAIL", "CHECK", "STATUS");
        for (c, s, d) in &self.rows {
            println!("{c:<w$}  {:<6}  {d}", s.as_str());
        }
        let failed: Vec<_> = self.rows.iter().filter(|r| r.1 == Status::Fail).collect();
        if failed.is_empty() {
            println!("\nall checks passed");
            true
        } else {
            println!("\n{} check(s) failed:", failed.len());
            for (c, _, d) in failed {
                println!("  - {c}: {d}");
            }
            false
        }
    }
}

pub async fn run(config: &Path) -> bool {
    let mut r = Report { rows: Vec::new() };
    let cfg: Config = match crate::load_config(config) {
        Ok(c) => {
            r.add("config", Status::Ok, config.display().to_string());
            c
        }
        Err(e) => {
            r.add("config", Status::Fail, e);
            return r.print();
        }
    };
    // Policies: the directory, then every file on its own so each bad one is named.
    let dir = &cfg.policy.dir;
    if !dir.is_dir() {
        r.add(
            "policy dir",
            Status::Fail,
            format!("{} does not exist or is not a directory", dir.display()),
        );
    } else {
        r.add("policy dir", Status::Ok, dir.display().to_string());
        let mut strict = cfg.clone();
        strict.policy.on_load_error = anvil_core::config::OnLoadError::Fail;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        if files.is_empty() {
            r.add(
                "policies",
                Status::Fail,
                format!("no *.toml policy in {}", dir.display()),
            );
        }
        for f in &files {
            let res = std::fs::read_to_string(f)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    anvil_core::policy::Policy::from_toml(&t, f).map_err(|e| e.to_string())
                })
                .and_then(|p| {
                    anvil_core::hooks::validate_policy_hooks(
                        &p,
                        &anvil_core::hooks::HookRegistry::builtin(),
                    )
                    .map(|_| p)
                    .map_err(|e| e.to_string())
                });
            match res {
                Ok(p) => r.add(
                    format!(
                        "policy {}",
                        f.file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default()
                    ),
                    Status::Ok,
                    format!("{} (priority {})", p.policy_name, p.priority),
                ),
                Err(e) => r.add(format!("policy {}", f.display()), Status::Fail, e),
            }
        }
        if let Err(e) = load_policy_dir(&strict) {
            if !files.is_empty() {
                r.add("policy set", Status::Fail, e);
            }
        }
    }
    // State dir writable; doctor does not create it (the daemon does at start).
    let sd = &cfg.daemon.state_dir;
    if sd.is_dir() {
        match tempfile_probe(sd) {
            Ok(()) => r.add("state dir", Status::Ok, sd.display().to_string()),
            Err(e) => r.add("state dir", Status::Fail, format!("{}: {e}", sd.display())),
        }
    } else {
        let mut parent = sd.as_path();
        while !parent.exists() {
            parent = parent.parent().unwrap_or(Path::new("/"));
        }
        match nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK) {
            Ok(()) if parent.is_dir() => r.add(
                "state dir",
                Status::Ok,
                format!(
                    "{} (created at daemon start; {} is writable)",
                    sd.display(),
                    parent.display()
                ),
            ),
            Ok(()) => r.add(
                "state dir",
                Status::Fail,
                format!("{}: {} is not a directory", sd.display(), parent.display()),
            ),
            Err(e) => r.add(
                "state dir",
                Status::Fail,
                format!(
                    "{}: cannot be created under {}: {e}",
                    sd.display(),
                    parent.display()
                ),
            ),
        }
    }
    disk_space(&mut r, &cfg);
    // The running daemon.
    let sock = &cfg.daemon.socket;
    match crate::client::request(sock, "GET", "/v1/health", None).await {
        Ok((200, body)) => r.add(
            "daemon socket",
            Status::Ok,
            format!("{} answers: {body}", sock.display()),
        ),
        Ok((s, body)) => r.add(
            "daemon socket",
            Status::Fail,
            format!("{} answered {s}: {body}", sock.display()),
        ),
        Err(e) if sock.exists() => r.add("daemon socket", Status::Fail, e),
        Err(_) => r.add(
            "daemon socket",
            Status::Info,
            format!("no daemon running on {}", sock.display()),
        ),
    }
    // Backends.
    let registry = build_registry(&cfg).await;
    let probes = registry.probes();
    if probes.is_empty() {
        r.add(
            "backends",
            Status::Fail,
            "no backend configured in [backends]",
        );
    }
    let needs_agent = probes
        .iter()
        .any(|(k, _)| matches!(k, BackendKind::Bubblewrap | BackendKind::Firecracker));
    for (k, p) in &probes {
        if p.available {
            r.add(
                format!("backend {k}"),
                Status::Ok,
                p.version.clone().unwrap_or_default(),
            );
        } else {
            r.add(
                format!("backend {k}"),
                Status::Fail,
                p.reason.clone().unwrap_or_default(),
            );
        }
    }
    if needs_agent {
        let agent = find_agent(&cfg);
        if agent.is_file() {
            r.add("guest agent", Status::Ok, agent.display().to_string());
        } else {
            r.add("guest agent", Status::Fail, format!("{} not found (build it with scripts/build-agent.sh or set [daemon].agent_binary)", agent.display()));
        }
    }
    cgroups(&mut r, &cfg);
    let fc = probes.iter().any(|(k, _)| *k == BackendKind::Firecracker);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => r.add(
            "kvm",
            Status::Ok,
            format!("/dev/kvm is usable ({})", kvm_kind()),
        ),
        Err(e) if fc => r.add(
            "kvm",
            Status::Fail,
            format!("/dev/kvm: {e} (firecracker is configured)"),
        ),
        Err(e) => r.add(
            "kvm",
            Status::Info,
            format!("/dev/kvm: {e} (only needed by firecracker)"),
        ),
    }
    r.print()
}

/// Free space of the state, images and templates dirs, one row per file system.
fn disk_space(r: &mut Report, cfg: &Config) {
    let dirs = [
        ("state dir", cfg.daemon.state_dir.clone()),
        ("images dir", cfg.storage_images_dir()),
        ("templates dir", cfg.storage_templates_dir()),
    ];
    let mut seen = Vec::new();
    for (what, dir) in dirs {
        let Some((fsid, free)) = fs_free(&dir) else {
            r.add(
                format!("disk space ({what})"),
                Status::Warn,
                format!("cannot stat {}", dir.display()),
            );
            continue;
        };
        if seen.contains(&fsid) {
            continue;
        }
        seen.push(fsid);
        let (status, amount) = if free < 1 << 30 {
            (Status::Warn, format!("{} MiB", free >> 20))
        } else {
            (Status::Ok, format!("{} GiB", free >> 30))
        };
        r.add(
            format!("disk space ({what})"),
            status,
            format!("{amount} free under {}", dir.display()),
        );
    }
}

/// (file system id, free bytes) of the nearest existing ancestor of `p`.
fn fs_free(p: &Path) -> Option<(u64, u64)> {
    let mut probe = p.to_path_buf();
    while !probe.exists() {
        probe = probe.parent()?.to_path_buf();
    }
    let st = nix::sys::statvfs::statvfs(&probe).ok()?;
    Some((
        st.filesystem_id() as u64,
        st.blocks_available() as u64 * st.fragment_size() as u64,
    ))
}

/// The cgroup layout with its controllers, `[cgroup].mode` against it, and where sandbox
/// cgroups go (`[cgroup].root` in every hierarchy).
fn cgroups(r: &mut Report, cfg: &Config) {
    let host = crate::util::cgroup_mode();
    let layout = match anvil_backends::cgroup::detect::from_proc() {
        Ok(l) => l,
        Err(e) => {
            r.add("cgroups", Status::Fail, format!("{host}: {e}"));
            return;
        }
    };
    let mut parts: Vec<String> = layout
        .v1
        .iter()
        .map(|(c, m)| format!("{c} ({})", m.display()))
        .collect();
    if let Some(u) = &layout.unified {
        let ctrls = std::fs::read_to_string(u.join("cgroup.controllers")).unwrap_or_default();
        let ctrls = ctrls.trim();
        parts.push(format!(
            "cgroup2 at {} [{}]",
            u.display(),
            if ctrls.is_empty() {
                "no controllers"
            } else {
                ctrls
            }
        ));
    }
    r.add(
        "cgroups",
        Status::Ok,
        format!("{host}: {}", parts.join(", ")),
    );
    if let Some(u) = &layout.unified {
        let on = anvil_backends::cgroup::dynmods::is_on(u).unwrap_or(false);
        let (status, text) = match (on, cfg.cgroup.favor_dynmods) {
            (true, _) => (Status::Ok, "on: cgroup migrations do not wait for RCU".to_string()),
            (false, true) => (Status::Info, "off now; the daemon remounts cgroup2 with it at start ([cgroup].favor_dynmods)".to_string()),
            (false, false) => (Status::Warn, "off and [cgroup].favor_dynmods = false: every sandbox start may wait 5-20 ms for an RCU grace period".to_string()),
        };
        r.add("cgroup favordynmods", status, text);
    }
    let wanted = cfg.cgroup.mode.as_str();
    let fits = match wanted {
        "v1" => matches!(host, "v1" | "hybrid"),
        "v2" => host == "v2",
        _ => true,
    };
    if !fits {
        r.add(
            "cgroup mode",
            Status::Fail,
            format!("[cgroup].mode = {wanted}, but this host is {host}; the daemon will not start"),
        );
    }
    let mut roots: Vec<String> = layout
        .v1
        .values()
        .chain(layout.unified.iter())
        .map(|m| m.join(&cfg.cgroup.root).display().to_string())
        .collect();
    if layout.mode == anvil_backends::cgroup::Mode::V2 {
        roots.truncate(1);
    }
    roots.dedup();
    r.add("cgroup root", Status::Info, roots.join(" "));
}

/// What kind of KVM this is: hardware (kvm_intel / kvm_amd, nested or not) or PVM.
fn kvm_kind() -> String {
    let module = |m: &str| Path::new("/sys/module").join(m).is_dir();
    let nested = |m: &str| {
        std::fs::read_to_string(Path::new("/sys/module").join(m).join("parameters/nested"))
            .map(|v| matches!(v.trim(), "Y" | "1"))
            .unwrap_or(false)
    };
    let hypervisor = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && l.contains(" hypervisor"))
        })
        .unwrap_or(false);
    let guest = if hypervisor { ", inside a VM" } else { "" };
    if module("kvm_pvm") {
        format!("PVM: software-based KVM{guest}; only PVM-enabled guest kernels boot at full speed")
    } else if module("kvm_intel") {
        format!(
            "kvm_intel, hardware{}{guest}",
            if nested("kvm_intel") {
                ", nested enabled"
            } else {
                ""
            }
        )
    } else if module("kvm_amd") {
        format!(
            "kvm_amd, hardware{}{guest}",
            if nested("kvm_amd") {
                ", nested enabled"
            } else {
                ""
            }
        )
    } else {
        format!("kvm module not identified{guest}")
    }
}

fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(".doctor-probe");
    std::fs::write(&p, b"ok")?;
    std::fs::remove_file(&p)
}
