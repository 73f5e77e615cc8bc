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

fn free_bytes(p: &Path) -> Option<u64> {
    let mut probe = p.to_path_buf();
    while !probe.exists() {
        probe = probe.parent()?.to_path_buf();
    }
    let st = nix::sys::statvfs::statvfs(&probe).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
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
    // State dir writable.
    let sd = &cfg.daemon.state_dir;
    match std::fs::create_dir_all(sd).and_then(|_| tempfile_probe(sd)) {
        Ok(()) => r.add("state dir", Status::Ok, sd.display().to_string()),
        Err(e) => r.add("state dir", Status::Fail, format!("{}: {e}", sd.display())),
    }
    match free_bytes(sd) {
        Some(b) if b < 1 << 30 => r.add(
            "disk space",
            Status::Warn,
            format!("{} MiB free under {}", b >> 20, sd.display()),
        ),
        Some(b) => r.add(
            "disk space",
            Status::Ok,
            format!("{} GiB free under {}", b >> 30, sd.display()),
        ),
        None => r.add("disk space", Status::Warn, "cannot stat the state dir"),
    }
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
    r.add("cgroup mode", Status::Info, crate::util::cgroup_mode());
    let fc = probes.iter().any(|(k, _)| *k == BackendKind::Firecracker);
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => r.add("kvm", Status::Ok, "/dev/kvm is usable"),
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

fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(".doctor-probe");
    std::fs::write(&p, b"ok")?;
    std::fs::remove_file(&p)
}
