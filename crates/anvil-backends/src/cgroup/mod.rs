//! cgroup v1/v2 management: one cgroup per sandbox under a daemon-owned root, with quotas,
//! freezing, killing everything inside, OOM counting and removal.
//!
//! Layouts (detected at start):
//! - [`Mode::V2`]: a cgroup2 tree with the memory/pids/cpu controllers (production hosts).
//! - [`Mode::V1`]: one v1 hierarchy per controller (memory, pids, cpu, freezer).
//! - [`Mode::Hybrid`]: v1 controllers plus a controller-less cgroup2 mount; the sandbox also
//!   gets a v2 directory there, whose `cgroup.kill` (kernels >= 5.14) kills race-free.
//!
//! All calls are synchronous file-system operations; async callers wrap the slow ones
//! (freeze, kill_all, remove) in `spawn_blocking`.

pub mod detect;
pub mod dynmods;
mod ops;

pub use detect::Layout;
pub use ops::{join_cgroup_raw, ProcsFds};

use crate::spec::Quota;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// v1 controllers a sandbox cgroup is created in.
pub const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "freezer"];
/// v2 controllers enabled for sandbox cgroups.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    V1,
    V2,
    Hybrid,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroups unusable: {0}")]
    Unusable(String),
    #[error("invalid cgroup name `{0}` (letters, digits, `.`, `_`, `-`; not `.`/`..`)")]
    InvalidName(String),
    #[error("timed out: {0}")]
    Timeout(String),
}

impl CgroupError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CgroupError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How the daemon wants its cgroups: the root directory name under every hierarchy, and
/// optionally a base directory used instead of the mounts in `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupConfig {
    pub root_name: String,
    #[serde(default)]
    pub base: Option<PathBuf>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            root_name: "anvil".into(),
            base: None,
        }
    }
}

/// Creates and opens sandbox cgroups below `<hierarchy>/<root_name>/`.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    layout: Layout,
    root_name: String,
}

impl CgroupManager {
    /// Detects the layout (from `cfg.base` if set, else `/proc/self/mountinfo`).
    pub fn new(cfg: &CgroupConfig) -> Result<Self, CgroupError> {
        let layout = match &cfg.base {
            Some(base) => detect::from_base(base)?,
            None => detect::from_proc()?,
        };
        Self::with_layout(layout, &cfg.root_name)
    }

    pub fn with_layout(layout: Layout, root_name: &str) -> Result<Self, CgroupError> {
        validate_name(root_name)?;
        Ok(CgroupManager {
            layout,
            root_name: root_name.to_string(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.layout.mode
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn root_name(&self) -> &str {
        &self.root_name
    }

    /// Creates the daemon's root cgroups (idempotent) to prove the hierarchies are writable.
    pub fn check_usable(&self) -> Result<(), CgroupError> {
        self.ensure_roots().map(|_| ())
    }

    /// The paths a cgroup named `name` has (or would have); nothing is touched.
    pub fn open(&self, name: &str) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        let mut cg = Cgroup {
            mode: self.layout.mode,
            name: name.to_string(),
            v1: BTreeMap::new(),
            unified: None,
        };
        match self.layout.mode {
            Mode::V2 => {
                cg.unified = self
                    .layout
                    .unified
                    .as_ref()
                    .map(|u| u.join(&self.root_name).join(name))
            }
            Mode::V1 | Mode::Hybrid => {
                for (ctrl, mount) in &self.layout.v1 {
                    cg.v1
                        .insert(ctrl.clone(), mount.join(&self.root_name).join(name));
                }
                // Hybrid: also a dir in the controller-less v2 tree, for `cgroup.kill` (used
                // when the kernel has it). Always present so `open` never depends on state.
                if self.layout.mode == Mode::Hybrid {
                    cg.unified = self
                        .layout
                        .unified
                        .as_ref()
                        .map(|u| u.join(&self.root_name).join(name));
                }
            }
        }
        Ok(cg)
    }

    /// Creates the cgroup `name` with `quota`. On error nothing created here is left behind.
    pub fn create(&self, name: &str, quota: &Quota) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        self.ensure_roots()?;
        let cg = self.open(name)?;
        let result = (|| {
            for dir in cg.dirs() {
                match std::fs::create_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(CgroupError::io(format!("mkdir {}", dir.display()), e)),
                }
            }
            self.set_quota(&cg, quota)
        })();
        if let Err(e) = result {
            if let Err(rm) = cg.remove() {
                tracing::warn!(cgroup = name, error = %rm, "cleanup of half-created cgroup failed");
            }
            return Err(e);
        }
        tracing::debug!(cgroup = name, mode = ?self.layout.mode, "cgroup created");
        Ok(cg)
    }

    /// Writes `quota` into an existing cgroup (a pre-started VMM's, taken for a sandbox).
    pub fn set_quota(&self, cg: &Cgroup, quota: &Quota) -> Result<(), CgroupError> {
        match self.layout.mode {
            Mode::V2 => write_v2_quota(cg, quota),
            Mode::V1 | Mode::Hybrid => write_v1_quota(cg, quota),
        }
    }

    /// Root dirs per hierarchy, created if missing; on v2 also enables the controllers for
    /// the root's children (and in the top-level `cgroup.subtree_control` for the root).
    fn ensure_roots(&self) -> Result<Vec<PathBuf>, CgroupError> {
        let mut roots = Vec::new();
        match self.layout.mode {
            Mode::V2 => {
                let top = self
                    .layout
                    .unified
                    .as_ref()
                    .ok_or_else(|| CgroupError::Unusable("no cgroup2 mount".into()))?;
                let root = top.join(&self.root_name);
                enable_controllers(top)?;
                mkdir_existing_ok(&root)?;
                enable_controllers(&root)?;
                roots.push(root);
            }
            Mode::V1 | Mode::Hybrid => {
                for mount in self.layout.v1.values() {
                    let root = mount.join(&self.root_name);
                    mkdir_existing_ok(&root)?;
                    roots.push(root);
                }
                if let (Mode::Hybrid, Some(u)) = (self.layout.mode, &self.layout.unified) {
                    let root = u.join(&self.root_name);
                    mkdir_existing_ok(&root)?;
                    roots.push(root);
                }
            }
        }
        Ok(roots)
    }
}

/// One sandbox's cgroup: its directories in every hierarchy. Serializable so the daemon can
/// persist it inside a runtime record and reopen it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    pub mode: Mode,
    pub name: String,
    /// v1 controller → directory (empty on pure v2).
    #[serde(default)]
    pub v1: BTreeMap<String, PathBuf>,
    /// v2 directory (pure v2: all controllers; hybrid: only for `cgroup.kill`).
    #[serde(default)]
    pub unified: Option<PathBuf>,
}

impl Cgroup {
    /// Every directory of this cgroup, across hierarchies.
    pub fn dirs(&self) -> Vec<&Path> {
        let mut d: Vec<&Path> = self.v1.values().map(PathBuf::as_path).collect();
        if let Some(u) = &self.unified {
            d.push(u);
        }
        d
    }

    /// Directory holding the memory controller files.
    pub fn memory_dir(&self) -> Option<&Path> {
        match self.mode {
            Mode::V2 => self.unified.as_deref(),
            _ => self.v1.get("memory").map(PathBuf::as_path),
        }
    }

    /// Whether any of the directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }
}

fn write_v1_quota(cg: &Cgroup, q: &Quota) -> Result<(), CgroupError> {
    let dir = |c: &str| {
        cg.v1
            .get(c)
            .ok_or_else(|| CgroupError::Unusable(format!("no v1 `{c}` hierarchy")))
    };
    let mem = dir("memory")?;
    if let Some(max) = q.memory_max {
        write_file(&mem.join("memory.limit_in_bytes"), &max.to_string())?;
    }
    if let Some(high) = q.memory_high {
        write_file(&mem.join("memory.soft_limit_in_bytes"), &high.to_string())?;
    }
    write_if_present(&mem.join("memory.swappiness"), "0")?;
    if let Some(p) = q.pids_max {
        write_file(&dir("pids")?.join("pids.max"), &p.to_string())?;
    }
    if let Some(s) = q.cpu_shares {
        write_file(
            &dir("cpu")?.join("cpu.shares"),
            &s.clamp(2, 262_144).to_string(),
        )?;
    }
    Ok(())
}

fn write_v2_quota(cg: &Cgroup, q: &Quota) -> Result<(), CgroupError> {
    let dir = cg
        .unified
        .as_ref()
        .ok_or_else(|| CgroupError::Unusable("no cgroup2 directory".into()))?;
    if let Some(max) = q.memory_max {
        write_file(&dir.join("memory.max"), &max.to_string())?;
    }
    if let Some(high) = q.memory_high {
        write_file(&dir.join("memory.high"), &high.to_string())?;
    }
    // Absent without swap accounting; then there is no swap to limit.
    write_if_present(&dir.join("memory.swap.max"), "0")?;
    if let Some(p) = q.pids_max {
        write_file(&dir.join("pids.max"), &p.to_string())?;
    }
    if let Some(s) = q.cpu_shares {
        write_file(&dir.join("cpu.weight"), &shares_to_weight(s).to_string())?;
    }
    Ok(())
}

/// v1 `cpu.shares` [2, 262144] → v2 `cpu.weight` [1, 10000] (the OCI/runc conversion).
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// Enables our controllers in `dir/cgroup.subtree_control` (only those `dir` offers).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let offered_path = dir.join("cgroup.controllers");
    let offered = std::fs::read_to_string(&offered_path)
        .map_err(|e| CgroupError::io(format!("read {}", offered_path.display()), e))?;
    let enabled_path = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&enabled_path)
        .map_err(|e| CgroupError::io(format!("read {}", enabled_path.display()), e))?;
    let offered: Vec<&str> = offered.split_whitespace().collect();
    let enabled: Vec<&str> = enabled
        .split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    let wanted: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| offered.contains(c) && !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    write_file(&enabled_path, &wanted.join(" "))
}

fn mkdir_existing_ok(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io(format!("mkdir {}", dir.display()), e)),
    }
}

/// Writes to an existing control file (never creates one: a missing file is an error).
pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| CgroupError::io(format!("open {}", path.display()), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| CgroupError::io(format!("write `{value}` to {}", path.display()), e))
}

fn write_if_present(path: &Path, value: &str) -> Result<(), CgroupError> {
    if path.exists() {
        write_file(path, value)
    } else {
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests;
