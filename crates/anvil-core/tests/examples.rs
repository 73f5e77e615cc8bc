//! The shipped example files parse with a plain TOML parser and load through the real loaders.

use anvil_core::backend::{BackendKind, ResetMode};
use anvil_core::config::{Config, ConfigError, OnLoadError, ShutdownMode};
use anvil_core::hooks::{validate_policy_hooks, HookRegistry};
use anvil_core::policy::{FallbackOnMissingHook, Policy, PolicyError, PolicySet};
use anvil_core::quantity::ByteSize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn read(rel: &str) -> (PathBuf, String) {
    let path = examples_dir().join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    // Independent check: a standard TOML parser accepts it.
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()));
    (path, text)
}

fn load_config(rel: &str) -> Config {
    let (path, text) = read(rel);
    Config::from_toml(&text, &path).unwrap_or_else(|e| panic!("{e}"))
}

fn load_policy(rel: &str) -> Policy {
    let (path, text) = read(rel);
    Policy::from_toml(&text, &path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn production_config() {
    let c = load_config("config.toml");
    assert_eq!(c.daemon.state_dir, Path::new("/var/lib/anvil"));
    assert_eq!(c.daemon.socket, Path::new("/run/anvil/api.sock"));
    assert_eq!(c.daemon.shutdown, ShutdownMode::Keep);
    assert!(c.listen.http_addr.is_none());
    assert_eq!(
        c.backends.binary(BackendKind::Bubblewrap),
        Some(Path::new("/usr/bin/bwrap"))
    );
    assert_eq!(
        c.backends.binary(BackendKind::Firecracker),
        Some(Path::new("/usr/local/bin/firecracker"))
    );
    assert!(!c.backends.is_configured(BackendKind::Mock));
    assert_eq!(c.policy.dir, Path::new("/etc/anvil/policies"));
    assert_eq!(c.policy.on_load_error, OnLoadError::Fail);
    assert_eq!(c.storage_images_dir(), Path::new("/var/lib/anvil/images"));
    assert_eq!(
        c.storage_templates_dir(),
        Path::new("/var/lib/anvil/templates")
    );
    // The annotated values are the defaults.
    let defaults = Config {
        origin: c.origin.clone(),
        backends: c.backends.clone(),
        storage: c.storage.clone(),
        ..Config::default()
    };
    assert_eq!(c, defaults);
}

#[test]
fn dev_config_is_relative_to_the_examples_dir() {
    let c = load_config("dev.toml");
    let dir = examples_dir();
    assert_eq!(c.daemon.state_dir, dir.join("../.anvil/state"));
    assert_eq!(c.daemon.socket, dir.join("../.anvil/api.sock"));
    assert_eq!(c.policy.dir, dir.join("policies"));
    assert_eq!(
        c.backends.binary(BackendKind::Mock),
        Some(Path::new("builtin"))
    );
    assert_eq!(
        c.backends.binary(BackendKind::Bubblewrap),
        Some(Path::new("/usr/bin/bwrap"))
    );
    assert_eq!(c.template.default.as_deref(), Some("busybox"));
    assert_eq!(c.storage_images_dir(), dir.join("../.anvil/state/images"));
    // Nothing root-owned: every path the daemon writes is under the checkout.
    let checkout = dir.join("..");
    for p in [&c.daemon.state_dir, &c.daemon.socket] {
        assert!(p.starts_with(&checkout), "{}", p.display());
    }
}

#[test]
fn agent_rl_policy() {
    let p = load_policy("policies/agent-rl.toml");
    assert_eq!(p.policy_name, "agent-rl-default");
    assert_eq!(p.priority, 100);
    assert_eq!(p.matches.workload_class, ["agent-rl"]);
    assert_eq!(
        p.select.backend_priority,
        [BackendKind::Firecracker, BackendKind::Bubblewrap]
    );
    assert_eq!(p.select.kernel_hooks, ["mm-template"]);
    assert_eq!(
        p.select.fallback_on_missing_hook,
        FallbackOnMissingHook::Degrade
    );
    assert_eq!(p.default_template(), Some("busybox"));
    assert!(p.pool.enabled);
    assert_eq!((p.pool.min, p.pool.target, p.pool.max), (2, 4, 16));
    assert_eq!(p.pool.warm_ttl.0, Duration::from_secs(600));
    assert_eq!(p.pool.reset_mode, ResetMode::MmTemplate);
    assert_eq!(p.quota.cpu_shares, Some(1024));
    assert_eq!(p.quota.memory_high, Some(ByteSize::mib(768)));
    assert_eq!(p.quota.memory_max, Some(ByteSize::gib(1)));
    assert_eq!(p.quota.pids_max, Some(512));
    assert_eq!(p.vm.vcpus, 1);
    assert_eq!(p.vm.memory_mib(), 256);
    assert_eq!(
        p.backend.firecracker.boot_args.as_deref(),
        Some("console=ttyS0 reboot=k panic=1 pci=off")
    );
    validate_policy_hooks(&p, &HookRegistry::builtin()).unwrap();
}

#[test]
fn agent_tool_policy() {
    let p = load_policy("policies/agent-tool.toml");
    assert_eq!(p.policy_name, "agent-tool-default");
    assert_eq!(p.priority, 90);
    assert_eq!(
        p.matches.workload_class,
        [
            "agent-tool",
            "dev-shell",
            "untrusted",
            "function",
            "serverless"
        ]
    );
    assert_eq!(
        p.select.backend_priority,
        [BackendKind::Bubblewrap, BackendKind::Firecracker]
    );
    assert_eq!(
        p.select.fallback_on_missing_hook,
        FallbackOnMissingHook::Continue
    );
    assert_eq!(p.default_template(), Some("busybox"));
    assert_eq!((p.pool.min, p.pool.target, p.pool.max), (0, 2, 8));
    assert_eq!(p.pool.warm_ttl.0, Duration::from_secs(1800));
    assert_eq!(p.pool.reset_mode, ResetMode::OverlayfsRollback);
    assert_eq!(p.quota.memory_max, Some(ByteSize::gib(2)));
    assert_eq!(p.quota.pids_max, Some(1024));
    assert_eq!(p.limits.default_ttl.unwrap().0, Duration::from_secs(3600));
    assert_eq!(p.limits.max_ttl.unwrap().0, Duration::from_secs(86400));
}

#[test]
fn example_policies_form_a_set() {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(examples_dir().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    files.sort();
    assert_eq!(files.len(), 2);
    let (set, warnings) = PolicySet::from_files(&files, OnLoadError::Fail).unwrap();
    assert!(warnings.is_empty());
    let none = BTreeMap::new();
    assert_eq!(
        set.evaluate("agent-rl", &none).unwrap().policy_name,
        "agent-rl-default"
    );
    for class in [
        "agent-tool",
        "dev-shell",
        "untrusted",
        "function",
        "serverless",
    ] {
        assert_eq!(
            set.evaluate(class, &none).unwrap().policy_name,
            "agent-tool-default"
        );
    }
    assert!(set.evaluate("batch", &none).is_err());
}

#[test]
fn unknown_key_in_an_example_is_rejected_with_file_and_key() {
    let (path, text) = read("config.toml");
    let bad = text.replace(
        "max_instances = 256",
        "max_instances = 256\nmax_instance = 3",
    );
    let e = Config::from_toml(&bad, &path).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }));
    let s = e.to_string();
    assert!(
        s.contains("config.toml") && s.contains("max_instance`"),
        "{s}"
    );
    assert!(s.contains("daemon.max_instance"), "{s}");

    let (path, text) = read("policies/agent-rl.toml");
    let bad = text.replace("[quota]\n", "[quota]\ncpu_quota = 5\n");
    let s = Policy::from_toml(&bad, &path).unwrap_err().to_string();
    assert!(
        s.contains("agent-rl.toml") && s.contains("quota.cpu_quota"),
        "{s}"
    );
}

#[test]
fn invalid_value_in_an_example_is_rejected_with_file_and_key() {
    let (path, text) = read("config.toml");
    let bad = text.replace("max_file_body = \"256Mi\"", "max_file_body = \"lots\"");
    let s = Config::from_toml(&bad, &path).unwrap_err().to_string();
    assert!(
        s.contains("config.toml") && s.contains("limits.max_file_body") && s.contains("lots"),
        "{s}"
    );

    let (path, text) = read("policies/agent-tool.toml");
    let bad = text.replace("max = 8", "max = 1");
    let e = Policy::from_toml(&bad, &path).unwrap_err();
    assert!(matches!(e, PolicyError::Invalid { .. }));
    let s = e.to_string();
    assert!(
        s.contains("agent-tool.toml") && s.contains("`pool.target`") && s.contains("max (1)"),
        "{s}"
    );

    let (path, text) = read("policies/agent-rl.toml");
    let bad = text.replace("memory = \"256Mi\"", "memory = \"-256Mi\"");
    let s = Policy::from_toml(&bad, &path).unwrap_err().to_string();
    assert!(
        s.contains("agent-rl.toml") && s.contains("vm.memory"),
        "{s}"
    );
}
