//! Acceptance 4 (`anvil daemon doctor`) and a daemon-level run of examples/config.toml
//! (acceptance 2 parses the examples in anvil-core; here the real daemon starts on it).
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn doctor(config: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "doctor", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A mock-only config in a temp dir with the given policy dir line and extra text.
fn mock_config(dir: &Path, policy_dir: &str, extra: &str) -> PathBuf {
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!("[daemon]\nstate_dir = \"state\"\nsocket = \"api.sock\"\n{extra}\n[backends]\nmock = \"builtin\"\n\n[policy]\ndir = \"{policy_dir}\"\n"),
    )
    .unwrap();
    cfg
}

#[test]
fn doctor_passes_on_dev_toml() {
    let dev = repo().join("examples/dev.toml");
    // The daemon looks for the agent next to its own executable (../x86_64-.../release).
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_anvil"));
    let agent = exe
        .parent()
        .unwrap()
        .join("../x86_64-unknown-linux-gnu/release/anvil-agent");
    if !agent.is_file() {
        eprintln!("SKIP: doctor on examples/dev.toml: the static agent is not built ({}; run scripts/build-agent.sh)", agent.display());
        return;
    }
    if !Path::new("/usr/bin/bwrap").is_file() {
        eprintln!("SKIP: doctor on examples/dev.toml: /usr/bin/bwrap is not installed");
        return;
    }
    let (ok, out) = doctor(&dev);
    assert!(ok, "doctor failed on examples/dev.toml:\n{out}");
    assert!(out.contains("all checks passed"), "{out}");
    for row in [
        "policy agent-rl.toml",
        "policy agent-tool.toml",
        "backend bubblewrap",
        "backend mock",
        "guest agent",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no `{row}` row:\n{out}"));
        assert!(line.contains(" ok "), "{line}");
    }
}

#[test]
fn doctor_names_a_missing_policy_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = mock_config(tmp.path(), "no-such-policies", "");
    let (ok, out) = doctor(&cfg);
    assert!(!ok, "doctor passed with a missing policy dir:\n{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("policy dir"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("FAIL") && line.contains("no-such-policies"),
        "{line}"
    );
    assert!(out.contains("check(s) failed"), "{out}");
}

#[test]
fn doctor_names_an_invalid_policy_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let pdir = tmp.path().join("policies");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("good.toml"), MOCK_POLICY).unwrap();
    std::fs::write(
        pdir.join("broken.toml"),
        MOCK_POLICY.replace(
            "policy_name = \"mock-default\"",
            "policy_name = \"b\"\nfavourite_colour = \"red\"",
        ),
    )
    .unwrap();
    let cfg = mock_config(tmp.path(), "policies", "");
    let (ok, out) = doctor(&cfg);
    assert!(!ok, "doctor passed with an invalid policy:\n{out}");
    let fail: Vec<_> = out.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(
        fail.iter()
            .any(|l| l.contains("broken.toml") && l.contains("favourite_colour")),
        "file and key named:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("policy good.toml") && l.contains(" ok ")),
        "{out}"
    );

    // An invalid value (min > target) is named too.
    std::fs::write(
        pdir.join("broken.toml"),
        MOCK_POOL_POLICY.replace("min = 1", "min = 4"),
    )
    .unwrap();
    let (ok, out) = doctor(&cfg);
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("FAIL") && l.contains("broken.toml") && l.contains("min")),
        "{out}"
    );
}

#[test]
fn doctor_names_an_unknown_config_key() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policies")).unwrap();
    std::fs::write(tmp.path().join("policies/mock.toml"), MOCK_POLICY).unwrap();
    let cfg = mock_config(tmp.path(), "policies", "max_sandboxez = 3\n");
    let (ok, out) = doctor(&cfg);
    assert!(!ok, "{out}");
    assert!(out.contains("max_sandboxez"), "key named:\n{out}");
    // The daemon refuses to start on it as well, naming the key.
    let st = Command::new(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "start", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("max_sandboxez"));
    // And the same config without the bad key is healthy.
    let cfg = mock_config(tmp.path(), "policies", "");
    let (ok, out) = doctor(&cfg);
    assert!(ok, "{out}");
}

/// examples/config.toml with only its host paths moved into a temp dir.
fn example_config(dir: &Path, firecracker: Option<&str>) -> (String, PathBuf) {
    let text = std::fs::read_to_string(repo().join("examples/config.toml")).unwrap();
    let socket = dir.join("api.sock");
    let cgroup = format!(
        "anvil-ex-{}",
        dir.file_name().unwrap().to_string_lossy().replace('.', "")
    );
    let mut swaps = vec![
        (
            "state_dir = \"/var/lib/anvil\"".to_string(),
            format!("state_dir = \"{}\"", dir.join("state").display()),
        ),
        (
            "socket = \"/run/anvil/api.sock\"".to_string(),
            format!("socket = \"{}\"", socket.display()),
        ),
        (
            "dir = \"/etc/anvil/policies\"".to_string(),
            format!("dir = \"{}\"", repo().join("examples/policies").display()),
        ),
        (
            "images_dir = \"/var/lib/anvil/images\"".to_string(),
            format!("images_dir = \"{}\"", dir.join("images").display()),
        ),
        (
            "root = \"anvil\"".to_string(),
            format!("root = \"{cgroup}\""),
        ),
    ];
    if let Some(fc) = firecracker {
        swaps.push((
            "firecracker = \"/usr/local/bin/firecracker\"".into(),
            format!("firecracker = \"{fc}\""),
        ));
    }
    let mut out = text;
    for (from, to) in swaps {
        assert_eq!(
            out.matches(&from).count(),
            1,
            "examples/config.toml no longer has `{from}` exactly once"
        );
        out = out.replace(&from, &to);
    }
    (out, socket)
}

#[test]
fn daemon_starts_on_the_example_config() {
    let tmp = tempfile::Builder::new()
        .prefix("anvil-ex-")
        .tempdir()
        .unwrap();
    let (text, socket) = example_config(tmp.path(), None);
    let d = Daemon::start_with_config(tmp, &text, socket);
    assert_eq!(d.get("/v1/health").json()["status"], "ok");
    let mut names: Vec<String> = d
        .get("/v1/policies")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec!["agent-rl-default", "agent-tool-default"]);
    let host = d.get("/v1/host").json();
    assert_eq!(host["capacity"]["max_instances"], 256);
    let backends = host["backends"].as_array().unwrap();
    for kind in ["bubblewrap", "firecracker"] {
        let b = backends
            .iter()
            .find(|b| b["backend"] == kind)
            .unwrap_or_else(|| panic!("{kind} not probed: {host}"));
        if b["available"] == true {
            assert!(b["version"].is_string(), "{b}");
        } else {
            assert!(
                b["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "unavailable without a reason: {b}"
            );
        }
    }
    assert!(
        backends.iter().all(|b| b["backend"] != "mock"),
        "mock is only there when configured"
    );
    assert!(
        d.dir.path().join("state/templates").is_dir(),
        "state lives in the temp state_dir"
    );
}

#[test]
fn daemon_starts_when_firecracker_is_missing() {
    let tmp = tempfile::Builder::new()
        .prefix("anvil-ex-")
        .tempdir()
        .unwrap();
    let (text, socket) = example_config(tmp.path(), Some("/nonexistent/bin/firecracker"));
    let d = Daemon::start_with_config(tmp, &text, socket);
    let host = d.get("/v1/host").json();
    let fc = host["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "firecracker")
        .unwrap()
        .clone();
    assert_eq!(fc["available"], false, "{fc}");
    assert!(
        fc["reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/bin/firecracker"),
        "reason names the binary: {fc}"
    );
    // Its policies name the template `busybox`, which this fresh state dir does not have.
    let r = d.post(
        "/v1/instances",
        serde_json::json!({"workload_class": "agent-rl"}),
    );
    let v = expect_error(&r, 422, Some("unknown_template"));
    assert!(v["error"].as_str().unwrap().contains("busybox"), "{v}");
}
