//! Policies (`policies/*.toml`, SPEC §6) and their evaluation.
//!
//! A policy is chosen by a sandbox's workload class (and image labels); it decides the backend
//! order, kernel hooks, templates, pool sizing, quotas, hook sequences and VM shape. Evaluation
//! is deterministic: highest `priority` wins, ties go to the lexicographically smallest name.

use crate::backend::{BackendKind, ResetMode};
use crate::config::OnLoadError;
use crate::quantity::{ByteSize, DurationValue};
use crate::tomlfile;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// The only policy schema version this build reads.
pub const MANIFEST_VERSION: u32 = 1;

/// A policy file that could not be loaded, or a policy set that is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {}{message}", file.display(), key.as_ref().map(|k| format!("at `{k}`: ")).unwrap_or_default())]
    Parse {
        file: PathBuf,
        key: Option<String>,
        message: String,
    },
    #[error("{}: `{key}`: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        reason: String,
    },
    #[error("policy_name `{name}` is defined twice: in {} and in {}", first.display(), second.display())]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

impl PolicyError {
    /// The file the error is about (the second file for duplicates).
    pub fn file(&self) -> &Path {
        match self {
            PolicyError::Parse { file, .. } | PolicyError::Invalid { file, .. } => file,
            PolicyError::Duplicate { second, .. } => second,
        }
    }
}

/// What to do when a policy's kernel hook is missing on the selected backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackOnMissingHook {
    /// Refuse the request (422 naming the hook).
    #[default]
    Fail,
    /// Go on with a weaker mechanism (e.g. reset mode falls back), noted in the decision.
    Degrade,
    /// Go on unchanged, noted in the decision.
    Continue,
}

/// Short alias of [`FallbackOnMissingHook`].
pub type FallbackMode = FallbackOnMissingHook;

impl FallbackOnMissingHook {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackOnMissingHook::Fail => "fail",
            FallbackOnMissingHook::Degrade => "degrade",
            FallbackOnMissingHook::Continue => "continue",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointStrategy {
    /// Memory where the backend can, else filesystem.
    #[default]
    Auto,
    Filesystem,
    Memory,
}

/// `[match]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    /// One class or a list (`"agent-rl"` or `["agent-tool", "dev-shell"]`).
    #[serde(deserialize_with = "one_or_many")]
    pub workload_class: Vec<String>,
    /// Every pair must be present in the request's labels.
    #[serde(default)]
    pub image_labels: BTreeMap<String, String>,
}

/// `[select]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectSection {
    /// Tried in order; the first available one serves the sandbox.
    pub backend_priority: Vec<BackendKind>,
    #[serde(default)]
    pub kernel_hooks: Vec<String>,
    /// Template names; the first is the default for this policy.
    #[serde(default)]
    pub templates: Vec<String>,
    #[serde(default)]
    pub fallback_on_missing_hook: FallbackOnMissingHook,
    /// false = loopback only inside the sandbox.
    #[serde(default)]
    pub network: bool,
}

/// `[pool]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyPool {
    pub enabled: bool,
    pub min: u32,
    pub target: u32,
    pub max: u32,
    pub warm_ttl: DurationValue,
    pub reset_mode: ResetMode,
}

impl Default for PolicyPool {
    fn default() -> Self {
        PolicyPool {
            enabled: false,
            min: 0,
            target: 0,
            max: 0,
            warm_ttl: DurationValue::secs(600),
            reset_mode: ResetMode::OverlayfsRollback,
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    pub enabled: bool,
    pub strategy: CheckpointStrategy,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            enabled: true,
            strategy: CheckpointStrategy::Auto,
        }
    }
}

/// `[quota]`: cgroup limits. Absent = no limit of that kind.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Quota {
    /// cgroup v1 `cpu.shares` (2..=262144); v2 `cpu.weight` is derived from it.
    pub cpu_shares: Option<u64>,
    /// Throttling threshold (v2 `memory.high`; v1 soft limit).
    pub memory_high: Option<ByteSize>,
    /// Hard limit (v2 `memory.max`; v1 `memory.limit_in_bytes`).
    pub memory_max: Option<ByteSize>,
    pub pids_max: Option<u64>,
}

/// One entry of a hook sequence: a registered hook name, or `exec:<shell command>` run inside
/// the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStep {
    Hook(String),
    Exec(String),
}

impl HookStep {
    pub fn parse(text: &str) -> Result<HookStep, String> {
        if let Some(cmd) = text.strip_prefix("exec:") {
            let cmd = cmd.trim();
            if cmd.is_empty() {
                return Err("`exec:` needs a command after the colon".into());
            }
            Ok(HookStep::Exec(cmd.to_string()))
        } else if text.trim().is_empty() {
            Err("empty hook step".into())
        } else {
            Ok(HookStep::Hook(text.trim().to_string()))
        }
    }
}

impl fmt::Display for HookStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookStep::Hook(h) => f.write_str(h),
            HookStep::Exec(c) => write!(f, "exec:{c}"),
        }
    }
}

impl Serialize for HookStep {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HookStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HookStep::parse(&s).map_err(de::Error::custom)
    }
}

impl utoipa::PartialSchema for HookStep {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "A hook name, or `exec:<shell command>` run inside the sandbox",
            ))
            .into()
    }
}
impl utoipa::ToSchema for HookStep {}

/// `[hooks.<event>]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HookSequence {
    pub sequence: Vec<HookStep>,
}

/// `[hooks]`: sequences run on lifecycle events, in order; a failing step fails the operation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HooksSection {
    pub on_create: HookSequence,
    pub on_reset: HookSequence,
    pub on_destroy: HookSequence,
}

impl HooksSection {
    /// `(event name, sequence)` for all three events.
    pub fn events(&self) -> [(&'static str, &HookSequence); 3] {
        [
            ("on_create", &self.on_create),
            ("on_reset", &self.on_reset),
            ("on_destroy", &self.on_destroy),
        ]
    }
}

/// `[vm]`: shape of VM sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct VmSection {
    pub vcpus: u32,
    pub memory: ByteSize,
}

impl Default for VmSection {
    fn default() -> Self {
        VmSection {
            vcpus: 1,
            memory: ByteSize::mib(256),
        }
    }
}

impl VmSection {
    /// Guest memory in MiB (validation guarantees it is whole).
    pub fn memory_mib(&self) -> u64 {
        self.memory.0 >> 20
    }
}

/// `[backend.firecracker]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FirecrackerOverrides {
    /// Kernel command line; None = the backend's default.
    pub boot_args: Option<String>,
    /// Attach a vsock device (the agent channel).
    pub enable_vsock: bool,
    /// Keep the guest serial console in the instance's log file.
    pub serial_log: bool,
}

impl Default for FirecrackerOverrides {
    fn default() -> Self {
        FirecrackerOverrides {
            boot_args: None,
            enable_vsock: true,
            serial_log: false,
        }
    }
}

/// `[backend]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BackendOverrides {
    pub firecracker: FirecrackerOverrides,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyLimits {
    /// TTL when the request gives none.
    pub default_ttl: Option<DurationValue>,
    /// Largest TTL a request may ask for.
    pub max_ttl: Option<DurationValue>,
}

/// One policy file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub manifest_version: u32,
    pub policy_name: String,
    pub priority: i64,
    #[serde(rename = "match")]
    pub matches: MatchSection,
    pub select: SelectSection,
    #[serde(default)]
    pub pool: PolicyPool,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default)]
    pub hooks: HooksSection,
    #[serde(default)]
    pub vm: VmSection,
    #[serde(default)]
    pub backend: BackendOverrides,
    #[serde(default)]
    pub limits: PolicyLimits,
    /// The file the policy came from.
    #[serde(skip)]
    pub origin: PathBuf,
}

/// `GET /v1/policies` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicySummary {
    pub name: String,
    pub priority: i64,
    pub workload_class: Vec<String>,
    pub backend_priority: Vec<BackendKind>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a workload class or a list of workload classes")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
}

/// Workload classes: 1..=64 of `[A-Za-z0-9._-]`.
pub fn validate_workload_class(class: &str) -> Result<(), String> {
    if class.is_empty() || class.len() > 64 {
        return Err(format!(
            "workload class `{class}` must be 1 to 64 characters"
        ));
    }
    if !class
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "workload class `{}` may only contain A-Z, a-z, 0-9, `.`, `_` and `-`",
            class.escape_default()
        ));
    }
    Ok(())
}

fn find_duplicate<T: Ord + Clone>(items: &[T]) -> Option<T> {
    let mut seen = BTreeSet::new();
    items.iter().find(|i| !seen.insert((*i).clone())).cloned()
}

impl Policy {
    /// Parses and validates one policy file's text.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
        let mut p: Policy = tomlfile::decode(text).map_err(|e| PolicyError::Parse {
            file: origin.to_path_buf(),
            key: e.key,
            message: e.message,
        })?;
        p.origin = origin.to_path_buf();
        p.validate()?;
        Ok(p)
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            file: self.origin.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// Field ranges and cross-field rules; errors name the key. Hook names are checked against
    /// the built-in hook registry.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.manifest_version != MANIFEST_VERSION {
            return Err(self.invalid(
                "manifest_version",
                format!(
                    "unsupported version {}; this anvil reads version {MANIFEST_VERSION}",
                    self.manifest_version
                ),
            ));
        }
        let n = &self.policy_name;
        if n.is_empty() || n.len() > 64 || !n.chars().all(is_name_char) {
            return Err(self.invalid(
                "policy_name",
                format!(
                    "`{}` must be 1 to 64 characters of a-z, 0-9, `-`, `_` and `.`",
                    n.escape_default()
                ),
            ));
        }

        let m = &self.matches;
        if m.workload_class.is_empty() {
            return Err(self.invalid("match.workload_class", "must name at least one class"));
        }
        for c in &m.workload_class {
            validate_workload_class(c).map_err(|e| self.invalid("match.workload_class", e))?;
        }
        if let Some(d) = find_duplicate(&m.workload_class) {
            return Err(self.invalid("match.workload_class", format!("`{d}` listed twice")));
        }
        if m.image_labels.keys().any(|k| k.is_empty()) {
            return Err(self.invalid("match.image_labels", "label keys must not be empty"));
        }

        let s = &self.select;
        if s.backend_priority.is_empty() {
            return Err(self.invalid("select.backend_priority", "must list at least one backend"));
        }
        if let Some(d) = find_duplicate(&s.backend_priority) {
            return Err(self.invalid("select.backend_priority", format!("`{d}` listed twice")));
        }
        if let Some(d) = find_duplicate(&s.kernel_hooks) {
            return Err(self.invalid("select.kernel_hooks", format!("`{d}` listed twice")));
        }
        for t in &s.templates {
            crate::template::validate_template_name(t)
                .map_err(|e| self.invalid("select.templates", e))?;
        }
        if let Some(d) = find_duplicate(&s.templates) {
            return Err(self.invalid("select.templates", format!("`{d}` listed twice")));
        }

        let p = &self.pool;
        if p.min > p.target {
            return Err(self.invalid(
                "pool.min",
                format!("min ({}) is greater than target ({})", p.min, p.target),
            ));
        }
        if p.target > p.max {
            return Err(self.invalid(
                "pool.target",
                format!("target ({}) is greater than max ({})", p.target, p.max),
            ));
        }
        if p.enabled && p.max == 0 {
            return Err(self.invalid("pool.max", "an enabled pool needs max >= 1"));
        }
        if p.warm_ttl.0.is_zero() {
            return Err(self.invalid("pool.warm_ttl", "must be greater than 0"));
        }

        let q = &self.quota;
        if let Some(c) = q.cpu_shares {
            if !(2..=262_144).contains(&c) {
                return Err(self.invalid("quota.cpu_shares", format!("{c} is outside 2..=262144")));
            }
        }
        const MIN_MEM: ByteSize = ByteSize::mib(4);
        for (key, v) in [
            ("quota.memory_high", q.memory_high),
            ("quota.memory_max", q.memory_max),
        ] {
            if let Some(v) = v {
                if v < MIN_MEM {
                    return Err(self.invalid(key, format!("{v} is below the minimum of {MIN_MEM}")));
                }
            }
        }
        if let (Some(high), Some(max)) = (q.memory_high, q.memory_max) {
            if high > max {
                return Err(self.invalid(
                    "quota.memory_high",
                    format!("memory_high ({high}) exceeds memory_max ({max})"),
                ));
            }
        }
        if q.pids_max == Some(0) {
            return Err(self.invalid("quota.pids_max", "must be at least 1"));
        }

        crate::hooks::validate_policy_hooks(self, &crate::hooks::HookRegistry::builtin())?;

        let vm = &self.vm;
        if !(1..=32).contains(&vm.vcpus) {
            return Err(self.invalid("vm.vcpus", format!("{} is outside 1..=32", vm.vcpus)));
        }
        if vm.memory < ByteSize::mib(64) {
            return Err(self.invalid(
                "vm.memory",
                format!("{} is below the minimum of 64Mi", vm.memory),
            ));
        }
        if !vm.memory.0.is_multiple_of(1 << 20) {
            return Err(self.invalid(
                "vm.memory",
                format!(
                    "{} is not a whole number of MiB (VM memory is sized in MiB)",
                    vm.memory
                ),
            ));
        }
        if let Some(args) = &self.backend.firecracker.boot_args {
            if args.trim().is_empty() || args.chars().any(|c| c.is_control()) {
                return Err(self.invalid(
                    "backend.firecracker.boot_args",
                    "must be a non-empty single-line kernel command line (omit it for the default)",
                ));
            }
        }

        let l = &self.limits;
        for (key, v) in [
            ("limits.default_ttl", l.default_ttl),
            ("limits.max_ttl", l.max_ttl),
        ] {
            if v.is_some_and(|d| d.0.is_zero()) {
                return Err(self.invalid(key, "must be greater than 0 (omit it for no limit)"));
            }
        }
        if let (Some(def), Some(max)) = (l.default_ttl, l.max_ttl) {
            if def > max {
                return Err(self.invalid(
                    "limits.default_ttl",
                    format!("default_ttl ({def}) exceeds max_ttl ({max})"),
                ));
            }
        }
        Ok(())
    }

    /// Whether this policy applies to a sandbox of `workload_class` with `labels`.
    pub fn applies_to(&self, workload_class: &str, labels: &BTreeMap<String, String>) -> bool {
        self.matches
            .workload_class
            .iter()
            .any(|c| c == workload_class)
            && self
                .matches
                .image_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The policy's default template (first of `select.templates`).
    pub fn default_template(&self) -> Option<&str> {
        self.select.templates.first().map(String::as_str)
    }

    pub fn summary(&self) -> PolicySummary {
        PolicySummary {
            name: self.policy_name.clone(),
            priority: self.priority,
            workload_class: self.matches.workload_class.clone(),
            backend_priority: self.select.backend_priority.clone(),
        }
    }
}

/// No policy matched a request (HTTP 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no policy matches workload_class `{workload_class}`{}", labels_suffix(.labels))]
pub struct NoMatchingPolicy {
    pub workload_class: String,
    pub labels: BTreeMap<String, String>,
}

fn labels_suffix(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        let pairs: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" with labels {}", pairs.join(","))
    }
}

/// A consistent set of policies, kept in evaluation order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Builds a set; duplicate `policy_name`s are an error naming both files.
    pub fn new(mut policies: Vec<Policy>) -> Result<PolicySet, PolicyError> {
        let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
        for p in &policies {
            if let Some(first) = seen.insert(&p.policy_name, &p.origin) {
                let (a, b) = if first <= p.origin.as_path() {
                    (first, p.origin.as_path())
                } else {
                    (p.origin.as_path(), first)
                };
                return Err(PolicyError::Duplicate {
                    name: p.policy_name.clone(),
                    first: a.to_path_buf(),
                    second: b.to_path_buf(),
                });
            }
        }
        policies.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.policy_name.cmp(&b.policy_name))
        });
        Ok(PolicySet { policies })
    }

    /// Parses every `(path, text)`. With `OnLoadError::Fail` the first bad file is the error;
    /// with `Warn` bad files are skipped and returned as warnings. Duplicates are always errors.
    pub fn from_files(
        files: &[(PathBuf, String)],
        on_load_error: OnLoadError,
    ) -> Result<(PolicySet, Vec<PolicyError>), PolicyError> {
        let mut ok = Vec::new();
        let mut skipped = Vec::new();
        for (path, text) in files {
            match Policy::from_toml(text, path) {
                Ok(p) => ok.push(p),
                Err(e) if on_load_error == OnLoadError::Warn => skipped.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok((PolicySet::new(ok)?, skipped))
    }

    /// The policy for a request: highest priority among matching policies, ties by name.
    pub fn evaluate(
        &self,
        workload_class: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<&Policy, NoMatchingPolicy> {
        self.policies
            .iter()
            .find(|p| p.applies_to(workload_class, labels))
            .ok_or_else(|| NoMatchingPolicy {
                workload_class: workload_class.to_string(),
                labels: labels.clone(),
            })
    }

    /// All policies in evaluation order (priority descending, then name ascending).
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.policy_name == name)
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn summaries(&self) -> Vec<PolicySummary> {
        self.policies.iter().map(Policy::summary).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = r#"
manifest_version = 1
policy_name = "p"
priority = 1
[match]
workload_class = "agent-rl"
[select]
backend_priority = ["bubblewrap"]
"#;

    fn load(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_toml(text, Path::new("/etc/anvil/policies/p.toml"))
    }

    fn named(name: &str, priority: i64, classes: &[&str], file: &str) -> Policy {
        let classes: Vec<String> = classes.iter().map(|c| format!("\"{c}\"")).collect();
        let text = format!(
            "manifest_version = 1\npolicy_name = \"{name}\"\npriority = {priority}\n[match]\nworkload_class = [{}]\n[select]\nbackend_priority = [\"mock\"]\n",
            classes.join(",")
        );
        Policy::from_toml(&text, Path::new(file)).unwrap()
    }

    #[test]
    fn minimal_policy_defaults() {
        let p = load(MINIMAL).unwrap();
        assert_eq!(p.matches.workload_class, vec!["agent-rl"]);
        assert!(p.matches.image_labels.is_empty());
        assert_eq!(
            p.select.fallback_on_missing_hook,
            FallbackOnMissingHook::Fail
        );
        assert!(!p.select.network);
        assert!(!p.pool.enabled);
        assert_eq!(p.pool.warm_ttl.0, Duration::from_secs(600));
        assert_eq!(p.pool.reset_mode, ResetMode::OverlayfsRollback);
        assert!(p.checkpoint.enabled);
        assert_eq!(p.checkpoint.strategy, CheckpointStrategy::Auto);
        assert_eq!(p.quota, Quota::default());
        assert_eq!(p.vm.vcpus, 1);
        assert_eq!(p.vm.memory_mib(), 256);
        assert!(p.backend.firecracker.enable_vsock);
        assert!(!p.backend.firecracker.serial_log);
        assert_eq!(p.origin, Path::new("/etc/anvil/policies/p.toml"));
        assert_eq!(p.default_template(), None);
    }

    #[test]
    fn full_policy() {
        let p = load(
            r#"
manifest_version = 1
policy_name = "full.policy_1"
priority = -5
[match]
workload_class = ["a", "b"]
image_labels = { tier = "gold" }
[select]
backend_priority = ["firecracker", "bubblewrap"]
kernel_hooks = ["mm-template", "vsock"]
templates = ["busybox", "debian"]
fallback_on_missing_hook = "degrade"
network = true
[pool]
enabled = true
min = 1
target = 2
max = 3
warm_ttl = "30m"
reset_mode = "mm-template"
[checkpoint]
enabled = false
strategy = "memory"
[quota]
cpu_shares = 512
memory_high = "768Mi"
memory_max = "1Gi"
pids_max = 100
[hooks.on_create]
sequence = ["cgroup-freezer", "exec: echo hi > /tmp/x"]
[hooks.on_reset]
sequence = ["overlayfs-rollback"]
[vm]
vcpus = 2
memory = "512Mi"
[backend.firecracker]
boot_args = "console=ttyS0"
enable_vsock = false
serial_log = true
[limits]
default_ttl = "1h"
max_ttl = 86400
"#,
        )
        .unwrap();
        assert_eq!(p.priority, -5);
        assert_eq!(p.matches.image_labels["tier"], "gold");
        assert_eq!(p.select.kernel_hooks, ["mm-template", "vsock"]);
        assert_eq!(p.default_template(), Some("busybox"));
        assert_eq!(p.pool.reset_mode, ResetMode::MmTemplate);
        assert_eq!(p.pool.warm_ttl.0, Duration::from_secs(1800));
        assert_eq!(p.quota.memory_high, Some(ByteSize::mib(768)));
        assert_eq!(p.quota.memory_max, Some(ByteSize::gib(1)));
        assert_eq!(
            p.hooks.on_create.sequence,
            vec![
                HookStep::Hook("cgroup-freezer".into()),
                HookStep::Exec("echo hi > /tmp/x".into())
            ]
        );
        assert_eq!(p.vm.memory_mib(), 512);
        assert_eq!(
            p.backend.firecracker.boot_args.as_deref(),
            Some("console=ttyS0")
        );
        assert_eq!(p.limits.max_ttl.unwrap().0, Duration::from_secs(86400));
        assert_eq!(p.checkpoint.strategy, CheckpointStrategy::Memory);
        // Serializes to something that parses back to the same policy.
        let text = toml::to_string(&p).unwrap();
        let again = load(&text).unwrap();
        assert_eq!(p, again, "{text}");
    }

    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    #[test]
    fn parse_errors_name_file_and_key() {
        let cases = [
            (with("bogus = 1\n"), "bogus"),
            (with("[pool]\nsize = 3\n"), "size"),
            (with("[quota]\nmemory_max = \"1Qi\"\n"), "quota.memory_max"),
            (with("[quota]\nmemory_max = -4\n"), "quota.memory_max"),
            (with("[pool]\nwarm_ttl = \"10 years\"\n"), "pool.warm_ttl"),
            (with("[pool]\nreset_mode = \"reboot\"\n"), "pool.reset_mode"),
            (
                with("[hooks.on_create]\nsequence = [\"exec:   \"]\n"),
                "hooks.on_create.sequence",
            ),
            (with("[hooks.on_boot]\nsequence = []\n"), "on_boot"),
            (with("[backend.gvisor]\nx = 1\n"), "gvisor"),
            (with("[backend.firecracker]\nvcpus = 1\n"), "vcpus"),
            (
                MINIMAL.replace("bubblewrap", "vmware"),
                "select.backend_priority",
            ),
            (MINIMAL.replace("priority = 1", ""), "priority"),
        ];
        for (text, key) in cases {
            let e = load(&text).unwrap_err();
            let s = e.to_string();
            assert!(matches!(e, PolicyError::Parse { .. }), "{s}");
            assert!(s.starts_with("/etc/anvil/policies/p.toml: "), "{s}");
            assert!(s.contains(key), "expected `{key}` in: {s}");
        }
    }

    #[test]
    fn validation_errors_name_file_and_key() {
        let cases = [
            (
                MINIMAL.replace("manifest_version = 1", "manifest_version = 2"),
                "manifest_version",
            ),
            (MINIMAL.replace("\"p\"", "\"Bad Name\""), "policy_name"),
            (MINIMAL.replace("\"p\"", "\"\""), "policy_name"),
            (
                MINIMAL.replace("\"agent-rl\"", "[]"),
                "match.workload_class",
            ),
            (
                MINIMAL.replace("\"agent-rl\"", "[\"a\", \"a\"]"),
                "match.workload_class",
            ),
            (
                MINIMAL.replace("\"agent-rl\"", "\"a b\""),
                "match.workload_class",
            ),
            (
                MINIMAL.replace("[\"bubblewrap\"]", "[]"),
                "select.backend_priority",
            ),
            (
                MINIMAL.replace("[\"bubblewrap\"]", "[\"mock\", \"mock\"]"),
                "select.backend_priority",
            ),
            (
                with("kernel_hooks = [\"ebpf-magic\"]\n"),
                "select.kernel_hooks",
            ),
            (with("templates = [\"Nope!\"]\n"), "select.templates"),
            (with("[pool]\nmin = 3\ntarget = 2\nmax = 5\n"), "pool.min"),
            (
                with("[pool]\nmin = 1\ntarget = 6\nmax = 5\n"),
                "pool.target",
            ),
            (with("[pool]\nenabled = true\n"), "pool.max"),
            (with("[pool]\nwarm_ttl = 0\n"), "pool.warm_ttl"),
            (with("[quota]\ncpu_shares = 1\n"), "quota.cpu_shares"),
            (with("[quota]\ncpu_shares = 262145\n"), "quota.cpu_shares"),
            (with("[quota]\nmemory_max = \"1Mi\"\n"), "quota.memory_max"),
            (
                with("[quota]\nmemory_high = \"2Gi\"\nmemory_max = \"1Gi\"\n"),
                "quota.memory_high",
            ),
            (with("[quota]\npids_max = 0\n"), "quota.pids_max"),
            (
                with("[hooks.on_reset]\nsequence = [\"nope\"]\n"),
                "hooks.on_reset.sequence",
            ),
            (with("[vm]\nvcpus = 0\n"), "vm.vcpus"),
            (with("[vm]\nvcpus = 33\n"), "vm.vcpus"),
            (with("[vm]\nmemory = \"32Mi\"\n"), "vm.memory"),
            (with("[vm]\nmemory = \"100M\"\n"), "vm.memory"),
            (
                with("[backend.firecracker]\nboot_args = \"\"\n"),
                "backend.firecracker.boot_args",
            ),
            (
                with("[limits]\ndefault_ttl = \"2d\"\nmax_ttl = \"1d\"\n"),
                "limits.default_ttl",
            ),
        ];
        for (text, key) in cases {
            let e = load(&text).unwrap_err();
            let s = e.to_string();
            assert!(matches!(e, PolicyError::Invalid { .. }), "{key}: {s}");
            assert!(
                s.starts_with("/etc/anvil/policies/p.toml: ") && s.contains(&format!("`{key}`")),
                "expected `{key}` in: {s}"
            );
        }
        // The pool example from the brief: all three values named.
        let s = load(&with("[pool]\nmin = 1\ntarget = 6\nmax = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(s.contains("target (6)") && s.contains("max (5)"), "{s}");
    }

    #[test]
    fn evaluation_priority_and_tie_break() {
        let set = PolicySet::new(vec![
            named("zeta", 10, &["x"], "/p/zeta.toml"),
            named("alpha", 10, &["x"], "/p/alpha.toml"),
            named("low", 1, &["x", "y"], "/p/low.toml"),
            named("high", 50, &["y"], "/p/high.toml"),
        ])
        .unwrap();
        let none = BTreeMap::new();
        assert_eq!(set.evaluate("x", &none).unwrap().policy_name, "alpha");
        assert_eq!(set.evaluate("y", &none).unwrap().policy_name, "high");
        let e = set.evaluate("z", &none).unwrap_err();
        assert_eq!(e.to_string(), "no policy matches workload_class `z`");
        let names: Vec<_> = set
            .policies()
            .iter()
            .map(|p| p.policy_name.as_str())
            .collect();
        assert_eq!(names, ["high", "alpha", "zeta", "low"]);
        assert_eq!(set.get("low").unwrap().priority, 1);
        assert!(set.get("nope").is_none());

        // Input order does not matter.
        let rev = PolicySet::new(set.policies().iter().rev().cloned().collect()).unwrap();
        assert_eq!(rev, set);
        assert_eq!(rev.evaluate("x", &none).unwrap().policy_name, "alpha");
    }

    #[test]
    fn image_labels_must_all_match() {
        let mut gold = named("gold", 100, &["x"], "/p/gold.toml");
        gold.matches
            .image_labels
            .insert("tier".into(), "gold".into());
        gold.matches.image_labels.insert("gpu".into(), "no".into());
        let set = PolicySet::new(vec![gold, named("plain", 1, &["x"], "/p/plain.toml")]).unwrap();
        let mut labels = BTreeMap::new();
        labels.insert("tier".to_string(), "gold".to_string());
        assert_eq!(set.evaluate("x", &labels).unwrap().policy_name, "plain");
        labels.insert("gpu".to_string(), "no".to_string());
        labels.insert("extra".to_string(), "ok".to_string());
        assert_eq!(set.evaluate("x", &labels).unwrap().policy_name, "gold");
        labels.insert("gpu".to_string(), "yes".to_string());
        assert_eq!(set.evaluate("x", &labels).unwrap().policy_name, "plain");
        let e = PolicySet::default()
            .evaluate("x", &labels)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra=ok,gpu=yes,tier=gold"), "{e}");
    }

    #[test]
    fn duplicates_name_both_files() {
        let e = PolicySet::new(vec![
            named("same", 1, &["x"], "/p/b.toml"),
            named("same", 2, &["y"], "/p/a.toml"),
        ])
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("`same`") && s.contains("/p/a.toml") && s.contains("/p/b.toml"),
            "{s}"
        );
    }

    #[test]
    fn from_files_fail_and_warn() {
        let files = vec![
            (PathBuf::from("/p/good.toml"), MINIMAL.to_string()),
            (
                PathBuf::from("/p/bad.toml"),
                "manifest_version = 1\n".to_string(),
            ),
        ];
        let e = PolicySet::from_files(&files, OnLoadError::Fail).unwrap_err();
        assert_eq!(e.file(), Path::new("/p/bad.toml"));
        let (set, warnings) = PolicySet::from_files(&files, OnLoadError::Warn).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].to_string().contains("/p/bad.toml"));
    }

    #[test]
    fn summary_shape() {
        let p = load(MINIMAL).unwrap();
        let j = serde_json::to_value(p.summary()).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"name":"p","priority":1,"workload_class":["agent-rl"],"backend_priority":["bubblewrap"]})
        );
    }
}
