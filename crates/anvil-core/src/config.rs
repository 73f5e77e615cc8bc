//! The daemon configuration file (`config.toml`, SPEC §5).
//!
//! Every section is optional and every key has a default. Unknown keys are errors that name the
//! key. Relative paths in the file are resolved against the directory that contains the file, so
//! a config such as `examples/dev.toml` works whatever the daemon's working directory is.
//! Backend binaries written as a bare name without `/` (such as `builtin` for the mock backend)
//! are kept verbatim.

use crate::backend::BackendKind;
use crate::quantity::{ByteSize, DurationValue};
use crate::tomlfile;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};

/// Name used in errors for a config that did not come from a file.
const BUILTIN_ORIGIN: &str = "<built-in defaults>";

/// A config file that could not be loaded. Display names the file and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// TOML syntax error, unknown key or a value of the wrong type/format.
    #[error("{}: {}{message}", file.display(), key.as_ref().map(|k| format!("at `{k}`: ")).unwrap_or_default())]
    Parse {
        file: PathBuf,
        key: Option<String>,
        message: String,
    },
    /// A value that parsed but is not acceptable (`section.key` named).
    #[error("{}: `{key}`: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// What the daemon does with running sandboxes when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Leave sandboxes running for the next daemon to adopt.
    #[default]
    Keep,
    /// Destroy every sandbox (termination reason `shutdown`).
    Destroy,
}

impl ShutdownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Keep => "keep",
            ShutdownMode::Destroy => "destroy",
        }
    }
}

/// `[policy].on_load_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLoadError {
    /// Any bad policy file fails the load (start or reload keeps the old set).
    #[default]
    Fail,
    /// Skip only the bad file, with a warning.
    Warn,
}

impl OnLoadError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnLoadError::Fail => "fail",
            OnLoadError::Warn => "warn",
        }
    }
}

/// `[cgroup].mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Detect at start.
    #[default]
    Auto,
    V1,
    V2,
}

impl CgroupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::Auto => "auto",
            CgroupMode::V1 => "v1",
            CgroupMode::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSection {
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Group owning the Unix socket (mode 0660); None = the daemon's group.
    pub socket_group: Option<String>,
    pub max_instances: u32,
    pub shutdown: ShutdownMode,
    /// Static guest agent binary; None = next to the daemon's executable.
    pub agent_binary: Option<PathBuf>,
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            state_dir: PathBuf::from("/var/lib/anvil"),
            socket: PathBuf::from("/run/anvil/api.sock"),
            socket_group: None,
            max_instances: 256,
            shutdown: ShutdownMode::Keep,
            agent_binary: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// TCP listener (`host:port`); None = Unix socket only.
    pub http_addr: Option<String>,
    /// File of bearer tokens accepted on TCP, one per line.
    pub tokens_file: Option<PathBuf>,
    /// Accept TCP requests without a token; must be set explicitly.
    pub allow_unauthenticated: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl ListenSection {
    /// The parsed TCP address, if one is configured and valid.
    pub fn http_socket_addr(&self) -> Option<SocketAddr> {
        self.http_addr.as_deref().and_then(|a| a.parse().ok())
    }
}

/// `[backends]`: backend kind -> binary path, plus the optional Firecracker `jailer`.
/// A backend is configured iff it has an entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendsSection {
    pub binaries: BTreeMap<BackendKind, PathBuf>,
    pub jailer: Option<PathBuf>,
}

impl BackendsSection {
    pub fn is_configured(&self, kind: BackendKind) -> bool {
        self.binaries.contains_key(&kind)
    }
    pub fn binary(&self, kind: BackendKind) -> Option<&Path> {
        self.binaries.get(&kind).map(PathBuf::as_path)
    }
    /// Configured kinds in a stable order.
    pub fn configured(&self) -> impl Iterator<Item = BackendKind> + '_ {
        self.binaries.keys().copied()
    }
}

impl Serialize for BackendsSection {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let extra = usize::from(self.jailer.is_some());
        let mut m = s.serialize_map(Some(self.binaries.len() + extra))?;
        for (k, v) in &self.binaries {
            m.serialize_entry(k.as_str(), v)?;
        }
        if let Some(j) = &self.jailer {
            m.serialize_entry("jailer", j)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for BackendsSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BackendsSection;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of backend name = \"binary path\" (and optionally jailer)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BackendsSection, A::Error> {
                let mut out = BackendsSection::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "jailer" {
                        let path: PathBuf = map.next_value()?;
                        out.jailer = Some(path);
                        continue;
                    }
                    let kind: BackendKind = key.parse().map_err(|e: String| {
                        de::Error::custom(format!("{e}; the only other key is `jailer`"))
                    })?;
                    let path: PathBuf = map.next_value()?;
                    if path.as_os_str().is_empty() {
                        return Err(de::Error::custom(format!(
                            "backends.{key}: binary path is empty"
                        )));
                    }
                    if out.binaries.insert(kind, path).is_some() {
                        return Err(de::Error::custom(format!("backends.{key} given twice")));
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// Directory of `*.toml` policy files.
    pub dir: PathBuf,
    pub on_load_error: OnLoadError,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            dir: PathBuf::from("/etc/anvil/policies"),
            on_load_error: OnLoadError::Fail,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Imported images (rootfs tarballs, kernels); default `<state_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// Built templates; default `<state_dir>/templates`.
    pub templates_dir: Option<PathBuf>,
}

/// Daemon-wide pool machinery (per-pool sizing comes from policies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    /// Master switch: false = no pre-warming at all, every create is cold.
    pub enabled: bool,
    /// Pool creations running at once, across all pools.
    pub refill_concurrency: u32,
    /// How often the refiller re-plans.
    pub refill_interval: DurationValue,
    /// First backoff after `failure_threshold` consecutive refill failures; doubles up to max.
    pub backoff_initial: DurationValue,
    pub backoff_max: DurationValue,
    pub failure_threshold: u32,
    /// Firecracker (without the jailer): VMM processes kept started, API socket up, in
    /// their own cgroup, waiting for a snapshot load. A restore takes one instead of
    /// spawning a VMM; 0 = off.
    pub vmm_spares: u32,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            enabled: true,
            refill_concurrency: 2,
            refill_interval: DurationValue::millis(200),
            backoff_initial: DurationValue::millis(500),
            backoff_max: DurationValue::secs(30),
            failure_threshold: 3,
            vmm_spares: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSection {
    /// Template used when neither the request nor the policy names one.
    pub default: Option<String>,
    /// How long a new sandbox's agent has to report ready.
    pub ready_timeout: DurationValue,
    /// Templates imported at start when no template of that name exists yet
    /// (`[[template.preload]] name = "busybox"` + `rootfs_dir = "..."`).
    pub preload: Vec<TemplatePreload>,
}

/// One `[[template.preload]]` entry: a rootfs directory registered under `name` at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatePreload {
    pub name: String,
    pub rootfs_dir: PathBuf,
}

impl Default for TemplateSection {
    fn default() -> Self {
        TemplateSection {
            default: None,
            ready_timeout: DurationValue::secs(10),
            preload: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Serve `GET /metrics` and `GET /v1/metrics`.
    pub enabled: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { enabled: true }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_json_body: ByteSize,
    pub max_file_body: ByteSize,
    pub request_timeout: DurationValue,
    pub max_concurrent_creates: u32,
    /// TTL of sandboxes whose request and policy give none; None = no deadline.
    pub default_ttl: Option<DurationValue>,
    /// Upper bound of any requested TTL; None = unbounded.
    pub max_ttl: Option<DurationValue>,
    /// Cold creates and pool refills are refused (503) while the host's MemAvailable is
    /// below this floor; None = no memory-based admission.
    pub min_free_memory: Option<ByteSize>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_json_body: ByteSize::mib(1),
            max_file_body: ByteSize::mib(256),
            request_timeout: DurationValue::secs(60),
            max_concurrent_creates: 8,
            default_ttl: None,
            max_ttl: None,
            min_free_memory: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupSection {
    /// Cgroup name under each hierarchy (relative, e.g. `anvil` or `system.slice/anvil`).
    pub root: String,
    pub mode: CgroupMode,
    /// Remount the cgroup2 hierarchy with `favordynmods` at start (Linux >= 6.0), so moving
    /// a sandbox's first process into its cgroup does not wait for an RCU grace period
    /// (5-20 ms per start otherwise). Host-wide and sticky; see docs/operations.md.
    pub favor_dynmods: bool,
}

impl Default for CgroupSection {
    fn default() -> Self {
        CgroupSection {
            root: "anvil".to_string(),
            mode: CgroupMode::Auto,
            favor_dynmods: true,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonSection,
    pub listen: ListenSection,
    pub backends: BackendsSection,
    pub policy: PolicySection,
    pub storage: StorageSection,
    pub pool: PoolSection,
    pub template: TemplateSection,
    pub metrics: MetricsSection,
    pub limits: LimitsSection,
    pub cgroup: CgroupSection,
    /// The file this config came from (None = built-in defaults).
    #[serde(skip)]
    pub origin: Option<PathBuf>,
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn resolve_opt(base: &Path, p: &mut Option<PathBuf>) {
    if let Some(p) = p {
        resolve(base, p);
    }
}

impl Config {
    /// Parses and validates `text`, the content of the file at `origin`. Relative paths are
    /// resolved against `origin`'s directory.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = tomlfile::decode(text).map_err(|e| ConfigError::Parse {
            file: origin.to_path_buf(),
            key: e.key,
            message: e.message,
        })?;
        cfg.origin = Some(origin.to_path_buf());
        let base = origin.parent().unwrap_or(Path::new("")).to_path_buf();
        cfg.resolve_paths(&base);
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.daemon.state_dir);
        resolve(base, &mut self.daemon.socket);
        resolve_opt(base, &mut self.daemon.agent_binary);
        resolve_opt(base, &mut self.listen.tokens_file);
        resolve_opt(base, &mut self.listen.tls_cert);
        resolve_opt(base, &mut self.listen.tls_key);
        for path in self.backends.binaries.values_mut() {
            // Bare names (`builtin`) are not paths.
            if path.components().count() > 1 {
                resolve(base, path);
            }
        }
        resolve_opt(base, &mut self.backends.jailer);
        resolve(base, &mut self.policy.dir);
        resolve_opt(base, &mut self.storage.images_dir);
        resolve_opt(base, &mut self.storage.templates_dir);
        for p in &mut self.template.preload {
            resolve(base, &mut p.rootfs_dir);
        }
    }

    fn origin_for_errors(&self) -> PathBuf {
        self.origin
            .clone()
            .unwrap_or_else(|| PathBuf::from(BUILTIN_ORIGIN))
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.origin_for_errors(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Checks cross-field rules and ranges; errors name `section.key`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.daemon;
        if d.state_dir.as_os_str().is_empty() {
            return Err(self.invalid("daemon.state_dir", "must not be empty"));
        }
        if d.socket.as_os_str().is_empty() {
            return Err(self.invalid("daemon.socket", "must not be empty"));
        }
        if d.max_instances == 0 {
            return Err(self.invalid("daemon.max_instances", "must be greater than 0"));
        }
        if let Some(g) = &d.socket_group {
            if g.is_empty() || g.contains(['/', ':', '\n']) || g.trim() != g {
                return Err(self.invalid(
                    "daemon.socket_group",
                    format!("`{g}` is not a valid group name"),
                ));
            }
        }

        let l = &self.listen;
        if let Some(addr) = &l.http_addr {
            if addr.parse::<SocketAddr>().is_err() {
                return Err(self.invalid(
                    "listen.http_addr",
                    format!("`{addr}` is not an `ip:port` socket address"),
                ));
            }
            if l.tokens_file.is_none() && !l.allow_unauthenticated {
                return Err(self.invalid(
                    "listen.http_addr",
                    "TCP requires `listen.tokens_file`, or `listen.allow_unauthenticated = true` set explicitly",
                ));
            }
        }
        match (&l.tls_cert, &l.tls_key) {
            (Some(_), None) => {
                return Err(self.invalid("listen.tls_key", "required when listen.tls_cert is set"))
            }
            (None, Some(_)) => {
                return Err(self.invalid("listen.tls_cert", "required when listen.tls_key is set"))
            }
            (Some(_), Some(_)) if l.http_addr.is_none() => {
                return Err(self.invalid(
                    "listen.tls_cert",
                    "TLS applies to the TCP listener; set listen.http_addr",
                ))
            }
            _ => {}
        }

        if let Some(p) = self.backends.binaries.get(&BackendKind::Mock) {
            if p != Path::new("builtin") {
                return Err(self.invalid(
                    "backends.mock",
                    format!(
                        "the mock backend is built in; write `mock = \"builtin\"`, not `{}`",
                        p.display()
                    ),
                ));
            }
        }
        if self.backends.jailer.is_some() && !self.backends.is_configured(BackendKind::Firecracker)
        {
            return Err(self.invalid(
                "backends.jailer",
                "the jailer is only used by firecracker, which is not configured",
            ));
        }

        if self.policy.dir.as_os_str().is_empty() {
            return Err(self.invalid("policy.dir", "must not be empty"));
        }

        let p = &self.pool;
        if p.refill_concurrency == 0 {
            return Err(self.invalid("pool.refill_concurrency", "must be greater than 0"));
        }
        if p.refill_interval.0.is_zero() {
            return Err(self.invalid("pool.refill_interval", "must be greater than 0"));
        }
        if p.backoff_initial.0.is_zero() {
            return Err(self.invalid("pool.backoff_initial", "must be greater than 0"));
        }
        if p.backoff_initial > p.backoff_max {
            return Err(self.invalid(
                "pool.backoff_max",
                format!(
                    "backoff_max ({}) is smaller than backoff_initial ({})",
                    p.backoff_max, p.backoff_initial
                ),
            ));
        }
        if p.failure_threshold == 0 {
            return Err(self.invalid("pool.failure_threshold", "must be at least 1"));
        }
        if self.pool.vmm_spares > 32 {
            return Err(self.invalid("pool.vmm_spares", "at most 32"));
        }

        if let Some(name) = &self.template.default {
            crate::template::validate_template_name(name)
                .map_err(|e| self.invalid("template.default", e))?;
        }
        if self.template.ready_timeout.0.is_zero() {
            return Err(self.invalid("template.ready_timeout", "must be greater than 0"));
        }
        for (i, p) in self.template.preload.iter().enumerate() {
            crate::template::validate_template_name(&p.name)
                .map_err(|e| self.invalid(&format!("template.preload[{i}].name"), e))?;
        }

        let lim = &self.limits;
        if lim.max_json_body.0 == 0 {
            return Err(self.invalid("limits.max_json_body", "must be greater than 0"));
        }
        if lim.max_file_body.0 == 0 {
            return Err(self.invalid("limits.max_file_body", "must be greater than 0"));
        }
        if lim.request_timeout.0.is_zero() {
            return Err(self.invalid("limits.request_timeout", "must be greater than 0"));
        }
        if lim.max_concurrent_creates == 0 {
            return Err(self.invalid("limits.max_concurrent_creates", "must be greater than 0"));
        }
        for (key, v) in [
            ("limits.default_ttl", lim.default_ttl),
            ("limits.max_ttl", lim.max_ttl),
        ] {
            if v.is_some_and(|d| d.0.is_zero()) {
                return Err(self.invalid(key, "must be greater than 0 (omit it for no limit)"));
            }
        }
        if lim.min_free_memory.is_some_and(|b| b.0 == 0) {
            return Err(self.invalid(
                "limits.min_free_memory",
                "must be greater than 0 (omit it for no memory floor)",
            ));
        }
        if let (Some(def), Some(max)) = (lim.default_ttl, lim.max_ttl) {
            if def > max {
                return Err(self.invalid(
                    "limits.default_ttl",
                    format!("default_ttl ({def}) exceeds max_ttl ({max})"),
                ));
            }
        }

        validate_cgroup_root(&self.cgroup.root).map_err(|e| self.invalid("cgroup.root", e))?;
        Ok(())
    }

    /// `[storage].templates_dir`, defaulting to `<state_dir>/templates`.
    pub fn storage_templates_dir(&self) -> PathBuf {
        self.storage
            .templates_dir
            .clone()
            .unwrap_or_else(|| self.daemon.state_dir.join("templates"))
    }

    /// `[storage].images_dir`, defaulting to `<state_dir>/images`.
    pub fn storage_images_dir(&self) -> PathBuf {
        self.storage
            .images_dir
            .clone()
            .unwrap_or_else(|| self.daemon.state_dir.join("images"))
    }
}

/// A cgroup name relative to each hierarchy root: non-empty components of safe characters,
/// no `.`/`..`, no leading `/`.
pub fn validate_cgroup_root(root: &str) -> Result<(), String> {
    if root.is_empty() {
        return Err("must not be empty".into());
    }
    if root.starts_with('/') {
        return Err(format!(
            "`{root}` must be relative to the cgroup hierarchy (no leading `/`)"
        ));
    }
    for comp in Path::new(root).components() {
        match comp {
            Component::Normal(c) => {
                let c = c.to_string_lossy();
                if !c.chars().all(|ch| {
                    ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '@' | ':')
                }) {
                    return Err(format!(
                        "`{root}`: component `{c}` has characters outside [A-Za-z0-9-_.@:]"
                    ));
                }
            }
            _ => return Err(format!("`{root}` must not contain `.` or `..` components")),
        }
    }
    if root.split('/').any(|c| c.is_empty() || c == ".") {
        return Err(format!("`{root}` has an empty or `.` component"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/anvil/config.toml"))
    }

    #[test]
    fn empty_file_is_defaults() {
        let c = load("").unwrap();
        let d = Config {
            origin: c.origin.clone(),
            ..Config::default()
        };
        assert_eq!(c, d);
        assert!(Config::default().validate().is_ok());
        assert_eq!(c.daemon.state_dir, Path::new("/var/lib/anvil"));
        assert_eq!(c.daemon.socket, Path::new("/run/anvil/api.sock"));
        assert_eq!(c.daemon.max_instances, 256);
        assert_eq!(c.daemon.shutdown, ShutdownMode::Keep);
        assert_eq!(c.daemon.log_level, LogLevel::Info);
        assert_eq!(c.policy.dir, Path::new("/etc/anvil/policies"));
        assert_eq!(c.pool.refill_interval.0, Duration::from_millis(200));
        assert_eq!(c.pool.backoff_max.0, Duration::from_secs(30));
        assert_eq!(c.limits.max_json_body.0, 1 << 20);
        assert_eq!(c.limits.max_file_body.0, 256 << 20);
        assert_eq!(c.limits.request_timeout.0, Duration::from_secs(60));
        assert_eq!(c.template.ready_timeout.0, Duration::from_secs(10));
        assert_eq!(c.cgroup.root, "anvil");
        assert!(c.metrics.enabled && c.pool.enabled);
        assert!(c.backends.binaries.is_empty());
        assert_eq!(c.storage_images_dir(), Path::new("/var/lib/anvil/images"));
        assert_eq!(
            c.storage_templates_dir(),
            Path::new("/var/lib/anvil/templates")
        );
    }

    #[test]
    fn min_free_memory_is_optional_and_parsed() {
        assert_eq!(load("").unwrap().limits.min_free_memory, None);
        let c = load("[limits]\nmin_free_memory = \"256Mi\"").unwrap();
        assert_eq!(c.limits.min_free_memory, Some(ByteSize::mib(256)));
        let e = load("[limits]\nmin_free_memory = \"12Qi\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.min_free_memory") && e.contains("12Qi"),
            "{e}"
        );
    }

    #[test]
    fn full_file() {
        let c = load(
            r#"
[daemon]
log_level = "debug"
log_format = "json"
state_dir = "/srv/anvil"
socket = "/run/anvil/x.sock"
socket_group = "anvil"
max_instances = 10
shutdown = "destroy"
agent_binary = "/usr/libexec/anvil/anvil-agent"

[listen]
http_addr = "127.0.0.1:14159"
tokens_file = "tokens"
tls_cert = "/etc/anvil/cert.pem"
tls_key = "/etc/anvil/key.pem"

[backends]
bubblewrap = "/usr/bin/bwrap"
firecracker = "/usr/local/bin/firecracker"
jailer = "/usr/local/bin/jailer"
mock = "builtin"

[policy]
dir = "policies"
on_load_error = "warn"

[storage]
templates_dir = "/data/templates"

[pool]
enabled = false
refill_concurrency = 4
refill_interval = "1s"
backoff_initial = 1
backoff_max = "5m"
failure_threshold = 5

[template]
default = "busybox"
ready_timeout = "30s"

[metrics]
enabled = false

[limits]
max_json_body = "2Mi"
max_file_body = 1073741824
request_timeout = "2m"
max_concurrent_creates = 3
default_ttl = "1h"
max_ttl = "1d"

[cgroup]
root = "system.slice/anvil"
mode = "v1"
"#,
        )
        .unwrap();
        assert_eq!(c.daemon.log_level, LogLevel::Debug);
        assert_eq!(c.daemon.log_format, LogFormat::Json);
        assert_eq!(c.daemon.shutdown, ShutdownMode::Destroy);
        assert_eq!(c.daemon.socket_group.as_deref(), Some("anvil"));
        assert_eq!(c.listen.http_socket_addr().unwrap().port(), 14159);
        assert_eq!(
            c.listen.tokens_file.as_deref(),
            Some(Path::new("/etc/anvil/tokens"))
        );
        assert_eq!(
            c.backends.binary(BackendKind::Bubblewrap),
            Some(Path::new("/usr/bin/bwrap"))
        );
        assert_eq!(
            c.backends.binary(BackendKind::Mock),
            Some(Path::new("builtin"))
        );
        assert!(!c.backends.is_configured(BackendKind::Gvisor));
        assert_eq!(
            c.backends.configured().collect::<Vec<_>>(),
            vec![
                BackendKind::Firecracker,
                BackendKind::Bubblewrap,
                BackendKind::Mock
            ]
        );
        assert_eq!(
            c.backends.jailer.as_deref(),
            Some(Path::new("/usr/local/bin/jailer"))
        );
        assert_eq!(c.policy.dir, Path::new("/etc/anvil/policies"));
        assert_eq!(c.policy.on_load_error, OnLoadError::Warn);
        assert_eq!(c.storage_templates_dir(), Path::new("/data/templates"));
        assert_eq!(c.storage_images_dir(), Path::new("/srv/anvil/images"));
        assert_eq!(c.pool.backoff_initial.0, Duration::from_secs(1));
        assert_eq!(c.limits.max_file_body.0, 1 << 30);
        assert_eq!(c.limits.max_ttl.unwrap().0, Duration::from_secs(86400));
        assert_eq!(c.cgroup.mode, CgroupMode::V1);
        assert_eq!(c.template.default.as_deref(), Some("busybox"));
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let c = Config::from_toml(
            "[daemon]\nstate_dir = \"../.anvil/state\"\n[backends]\nbubblewrap = \"bin/bwrap\"\nmock = \"builtin\"\n",
            Path::new("/src/anvil/examples/dev.toml"),
        )
        .unwrap();
        assert_eq!(
            c.daemon.state_dir,
            Path::new("/src/anvil/examples/../.anvil/state")
        );
        assert_eq!(
            c.backends.binary(BackendKind::Bubblewrap),
            Some(Path::new("/src/anvil/examples/bin/bwrap"))
        );
        assert_eq!(
            c.backends.binary(BackendKind::Mock),
            Some(Path::new("builtin"))
        );
        assert_eq!(
            c.storage_images_dir(),
            Path::new("/src/anvil/examples/../.anvil/state/images")
        );
    }

    #[test]
    fn unknown_keys_name_file_and_key() {
        let e = load("[daemon]\nlog_levle = \"info\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/anvil/config.toml: "), "{e}");
        assert!(e.contains("log_levle") && e.contains("daemon"), "{e}");
        let e = load("[nonsense]\nx = 1\n").unwrap_err().to_string();
        assert!(e.contains("nonsense"), "{e}");
        let e = load("[backends]\nvmware = \"/bin/vmware\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vmware") && e.contains("config.toml"), "{e}");
        let e = load("[limits]\nmax_json_body = \"1Qi\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.max_json_body") && e.contains("1Qi"),
            "{e}"
        );
        let e = load("[daemon]\nlog_level = \"loud\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("daemon.log_level") && e.contains("loud"), "{e}");
        let e = load("[pool]\nrefill_interval = \"-1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool.refill_interval"), "{e}");
        let e = load("[daemon\n").unwrap_err().to_string();
        assert!(e.contains("config.toml") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn validation_names_section_and_key() {
        let cases = [
            ("[daemon]\nmax_instances = 0", "daemon.max_instances"),
            ("[listen]\nhttp_addr = \"localhost\"\nallow_unauthenticated = true", "listen.http_addr"),
            ("[listen]\nhttp_addr = \"127.0.0.1:1\"", "listen.http_addr"),
            ("[listen]\nhttp_addr = \"127.0.0.1:1\"\nallow_unauthenticated = true\ntls_cert = \"c\"", "listen.tls_key"),
            ("[listen]\ntls_key = \"k\"", "listen.tls_cert"),
            ("[listen]\ntls_key = \"k\"\ntls_cert = \"c\"", "listen.tls_cert"),
            ("[backends]\njailer = \"/j\"", "backends.jailer"),
            ("[backends]\nmock = \"/bin/true\"", "backends.mock"),
            ("[pool]\nrefill_concurrency = 0", "pool.refill_concurrency"),
            ("[pool]\nbackoff_initial = \"1m\"\nbackoff_max = \"1s\"", "pool.backoff_max"),
            ("[pool]\nfailure_threshold = 0", "pool.failure_threshold"),
            ("[template]\ndefault = \"Bad Name\"", "template.default"),
            ("[limits]\nmax_concurrent_creates = 0", "limits.max_concurrent_creates"),
            ("[limits]\ndefault_ttl = \"2h\"\nmax_ttl = \"1h\"", "limits.default_ttl"),
            ("[limits]\nmax_ttl = 0", "limits.max_ttl"),
            ("[limits]\nmin_free_memory = 0", "limits.min_free_memory"),
            ("[cgroup]\nroot = \"../escape\"", "cgroup.root"),
            ("[cgroup]\nroot = \"/abs\"", "cgroup.root"),
            ("[cgroup]\nroot = \"\"", "cgroup.root"),
            ("[cgroup]\nroot = \"a//b\"", "cgroup.root"),
        ];
        for (text, key) in cases {
            let e = load(text).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{text}: {e}");
            let s = e.to_string();
            assert!(
                s.contains(&format!("`{key}`")) && s.contains("config.toml"),
                "{text}: {s}"
            );
        }
        // Allowed combinations.
        load("[listen]\nhttp_addr = \"[::1]:14159\"\ntokens_file = \"/etc/anvil/tokens\"").unwrap();
        load("[listen]\ntokens_file = \"/etc/anvil/tokens\"").unwrap();
        load("[cgroup]\nroot = \"system.slice/anvil.service\"").unwrap();
    }

    #[test]
    fn round_trips_through_serialize() {
        let c = load("[backends]\nbubblewrap = \"/usr/bin/bwrap\"\nmock = \"builtin\"\n[limits]\nmax_ttl = \"1d\"").unwrap();
        let text = toml::to_string(&c).unwrap();
        let again = load(&text).unwrap();
        assert_eq!(c, again, "{text}");
    }
}
