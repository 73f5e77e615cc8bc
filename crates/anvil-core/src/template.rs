//! Template records and the in-memory registry (SPEC §4 templates, §7).
//!
//! A template is what sandboxes start from: a rootfs directory (namespace backends) or a kernel +
//! read-only rootfs image + boot snapshot (VM backends). The daemon owns the files and the
//! durable store; this registry is the index it answers lookups from.

use crate::backend::BackendKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use utoipa::ToSchema;

/// Longest template name.
pub const MAX_TEMPLATE_NAME_LEN: usize = 63;

/// Template names: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_template_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("template name must not be empty".into()),
        Some(c) if !(c.is_ascii_lowercase() || c.is_ascii_digit()) => {
            return Err(format!(
                "template name `{}` must start with a-z or 0-9",
                name.escape_default()
            ))
        }
        Some(_) => {}
    }
    if name.len() > MAX_TEMPLATE_NAME_LEN {
        return Err(format!(
            "template name `{name}` is longer than {MAX_TEMPLATE_NAME_LEN} characters"
        ));
    }
    if let Some(bad) = chars
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "template name `{}` contains `{}`; allowed are a-z, 0-9, `.`, `_` and `-`",
            name.escape_default(),
            bad.escape_default()
        ));
    }
    Ok(())
}

/// Build state of a template. `"building"`, `"ready"` or `{"failed": {"reason": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateStatus {
    Building,
    Ready,
    Failed { reason: String },
}

impl TemplateStatus {
    pub fn is_ready(&self) -> bool {
        matches!(self, TemplateStatus::Ready)
    }
    pub fn failure_reason(&self) -> Option<&str> {
        match self {
            TemplateStatus::Failed { reason } => Some(reason),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            TemplateStatus::Building => "building",
            TemplateStatus::Ready => "ready",
            TemplateStatus::Failed { .. } => "failed",
        }
    }
}

/// One template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateRecord {
    pub id: String,
    pub name: String,
    /// The backend this template was built for; None = usable by any backend that can use
    /// its files.
    pub backend_hint: Option<BackendKind>,
    /// Digest of the content (e.g. `sha256:<hex>`); pools are keyed by it.
    pub image_digest: String,
    /// Root filesystem as a directory (namespace backends; overlay lower layer).
    #[schema(value_type = Option<String>)]
    pub rootfs_dir: Option<PathBuf>,
    /// Root filesystem as a block image (VM backends).
    #[schema(value_type = Option<String>)]
    pub rootfs_image: Option<PathBuf>,
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    #[schema(value_type = Option<String>)]
    pub initramfs: Option<PathBuf>,
    /// Boot snapshot (memory + VM state) taken once the agent was ready.
    #[schema(value_type = Option<String>)]
    pub snapshot_dir: Option<PathBuf>,
    /// For VM guests without an agent: ready when this serial line appears.
    #[serde(default)]
    pub ready_marker: Option<String>,
    pub status: TemplateStatus,
    /// RFC 3339 timestamp.
    pub created_at: String,
    pub size_bytes: u64,
}

impl TemplateRecord {
    /// Files a VM backend needs; a namespace backend needs `rootfs_dir`.
    pub fn has_vm_parts(&self) -> bool {
        self.kernel.is_some() && self.rootfs_image.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid template: {0}")]
    Invalid(String),
    #[error("template id `{0}` already exists")]
    DuplicateId(String),
    #[error("template name `{name}` is already used by template `{existing_id}`")]
    DuplicateName { name: String, existing_id: String },
    #[error("no template `{0}`")]
    NotFound(String),
    #[error("template `{0}` is in use")]
    InUse(String),
}

/// Templates by id, with a name index. Names and ids are unique.
#[derive(Debug, Clone, Default)]
pub struct TemplateRegistry {
    by_id: BTreeMap<String, TemplateRecord>,
    by_name: BTreeMap<String, String>,
}

impl TemplateRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds a template; its id and name must be valid and unused.
    pub fn insert(&mut self, rec: TemplateRecord) -> Result<(), TemplateError> {
        crate::ids::validate_template_id(&rec.id).map_err(TemplateError::Invalid)?;
        validate_template_name(&rec.name).map_err(TemplateError::Invalid)?;
        if self.by_id.contains_key(&rec.id) {
            return Err(TemplateError::DuplicateId(rec.id));
        }
        if let Some(existing) = self.by_name.get(&rec.name) {
            return Err(TemplateError::DuplicateName {
                name: rec.name,
                existing_id: existing.clone(),
            });
        }
        self.by_name.insert(rec.name.clone(), rec.id.clone());
        self.by_id.insert(rec.id.clone(), rec);
        Ok(())
    }

    /// Replaces the record with the same id (name may not change to one used by another).
    pub fn update(&mut self, rec: TemplateRecord) -> Result<(), TemplateError> {
        let old = self
            .by_id
            .get(&rec.id)
            .ok_or_else(|| TemplateError::NotFound(rec.id.clone()))?;
        if old.name != rec.name {
            validate_template_name(&rec.name).map_err(TemplateError::Invalid)?;
            if let Some(existing) = self.by_name.get(&rec.name) {
                return Err(TemplateError::DuplicateName {
                    name: rec.name,
                    existing_id: existing.clone(),
                });
            }
            self.by_name.remove(&old.name);
            self.by_name.insert(rec.name.clone(), rec.id.clone());
        }
        self.by_id.insert(rec.id.clone(), rec);
        Ok(())
    }

    pub fn set_status(&mut self, id: &str, status: TemplateStatus) -> Result<(), TemplateError> {
        let rec = self
            .by_id
            .get_mut(id)
            .ok_or_else(|| TemplateError::NotFound(id.to_string()))?;
        rec.status = status;
        Ok(())
    }

    /// Looks up by id first, then by name.
    pub fn get(&self, id_or_name: &str) -> Option<&TemplateRecord> {
        self.by_id.get(id_or_name).or_else(|| {
            self.by_name
                .get(id_or_name)
                .and_then(|id| self.by_id.get(id))
        })
    }

    pub fn get_by_id(&self, id: &str) -> Option<&TemplateRecord> {
        self.by_id.get(id)
    }

    pub fn get_by_name(&self, name: &str) -> Option<&TemplateRecord> {
        self.by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    /// All templates sorted by name.
    pub fn list(&self) -> Vec<&TemplateRecord> {
        self.by_name
            .values()
            .filter_map(|id| self.by_id.get(id))
            .collect()
    }

    /// Removes unconditionally (the caller checked it is unused, or is rolling back a build).
    pub fn remove(&mut self, id: &str) -> Option<TemplateRecord> {
        let rec = self.by_id.remove(id)?;
        self.by_name.remove(&rec.name);
        Some(rec)
    }

    /// Removes `id_or_name` unless `in_use` says an instance, checkpoint or pool refers to it.
    pub fn remove_unused(
        &mut self,
        id_or_name: &str,
        in_use: &dyn Fn(&TemplateRecord) -> bool,
    ) -> Result<TemplateRecord, TemplateError> {
        let rec = self
            .get(id_or_name)
            .ok_or_else(|| TemplateError::NotFound(id_or_name.to_string()))?;
        if in_use(rec) {
            return Err(TemplateError::InUse(rec.id.clone()));
        }
        let id = rec.id.clone();
        self.remove(&id)
            .ok_or(TemplateError::NotFound(id_or_name.to_string()))
    }

    /// Ids of templates that `in_use` does not claim, sorted by name: what a GC may delete.
    pub fn gc_candidates(&self, in_use: &dyn Fn(&TemplateRecord) -> bool) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|r| !in_use(r))
            .map(|r| r.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, name: &str) -> TemplateRecord {
        TemplateRecord {
            id: id.into(),
            name: name.into(),
            backend_hint: Some(BackendKind::Bubblewrap),
            image_digest: format!("sha256:{id}"),
            rootfs_dir: Some(PathBuf::from(format!(
                "/var/lib/anvil/templates/{id}/rootfs"
            ))),
            rootfs_image: None,
            kernel: None,
            initramfs: None,
            snapshot_dir: None,
            ready_marker: None,
            status: TemplateStatus::Ready,
            created_at: "2025-01-01T00:00:00Z".into(),
            size_bytes: 42,
        }
    }

    #[test]
    fn names() {
        for ok in [
            "busybox",
            "a",
            "debian-12.1",
            "x_y",
            "0abc",
            &"a".repeat(63),
        ] {
            validate_template_name(ok).unwrap();
        }
        for bad in [
            "",
            "Busybox",
            "-x",
            ".x",
            "a b",
            "a/b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(validate_template_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn insert_get_list_remove() {
        let mut r = TemplateRegistry::new();
        r.insert(rec("t2", "zeta")).unwrap();
        r.insert(rec("t1", "alpha")).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.get("t1").unwrap().name, "alpha");
        assert_eq!(r.get("zeta").unwrap().id, "t2");
        assert!(r.get("nope").is_none());
        let names: Vec<_> = r.list().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(
            r.insert(rec("t1", "other")).unwrap_err(),
            TemplateError::DuplicateId("t1".into())
        );
        assert!(matches!(
            r.insert(rec("t3", "alpha")).unwrap_err(),
            TemplateError::DuplicateName { .. }
        ));
        assert!(matches!(
            r.insert(rec("../x", "x")).unwrap_err(),
            TemplateError::Invalid(_)
        ));
        r.set_status(
            "t1",
            TemplateStatus::Failed {
                reason: "boom".into(),
            },
        )
        .unwrap();
        assert_eq!(
            r.get("alpha").unwrap().status.failure_reason(),
            Some("boom")
        );
        assert!(r.set_status("zz", TemplateStatus::Ready).is_err());
        assert_eq!(r.remove("t1").unwrap().name, "alpha");
        assert!(r.get("alpha").is_none());
        r.insert(rec("t4", "alpha")).unwrap();
    }

    #[test]
    fn update_renames_and_guards_names() {
        let mut r = TemplateRegistry::new();
        r.insert(rec("t1", "a")).unwrap();
        r.insert(rec("t2", "b")).unwrap();
        assert!(r.update(rec("t1", "b")).is_err());
        r.update(rec("t1", "c")).unwrap();
        assert!(r.get("a").is_none());
        assert_eq!(r.get("c").unwrap().id, "t1");
        assert!(r.update(rec("t9", "q")).is_err());
    }

    #[test]
    fn in_use_guards_removal_and_gc() {
        let mut r = TemplateRegistry::new();
        r.insert(rec("t1", "busybox")).unwrap();
        r.insert(rec("t2", "old")).unwrap();
        let used = |t: &TemplateRecord| t.id == "t1";
        assert_eq!(r.gc_candidates(&used), vec!["t2".to_string()]);
        assert_eq!(
            r.remove_unused("busybox", &used).unwrap_err(),
            TemplateError::InUse("t1".into())
        );
        assert_eq!(r.remove_unused("old", &used).unwrap().id, "t2");
        assert_eq!(
            r.remove_unused("old", &used).unwrap_err(),
            TemplateError::NotFound("old".into())
        );
    }

    #[test]
    fn status_wire_format() {
        assert_eq!(
            serde_json::to_value(TemplateStatus::Ready).unwrap(),
            "ready"
        );
        assert_eq!(
            serde_json::to_value(TemplateStatus::Failed { reason: "x".into() }).unwrap(),
            serde_json::json!({"failed": {"reason": "x"}})
        );
        let r = rec("t1", "busybox");
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<TemplateRecord>(&j).unwrap(), r);
    }
}
