//! Template import (a rootfs from a directory or a tarball), content digests, deletion, GC.

use crate::manager::{Manager, OpError};
use crate::model::{now_ms, rfc3339, TemplateGcResponse, TemplateRequest};
use anvil_core::lifecycle::SandboxState;
use anvil_core::template::{TemplateRecord, TemplateStatus};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::info;

/// A content digest of a directory tree: every entry's relative path, type, mode, owner,
/// size and content (or link target), in sorted order.
pub fn tree_digest(root: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let r = rel.join(&name);
            let p = root.join(&r);
            let md = std::fs::symlink_metadata(&p)?;
            let ft = md.file_type();
            h.update(r.to_string_lossy().as_bytes());
            h.update([0]);
            h.update(format!("{:o}:{}:{}", md.mode(), md.uid(), md.gid()).as_bytes());
            if ft.is_symlink() {
                h.update(b"L");
                h.update(std::fs::read_link(&p)?.to_string_lossy().as_bytes());
            } else if ft.is_file() {
                h.update(b"F");
                h.update(md.len().to_le_bytes());
                let mut f = std::fs::File::open(&p)?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            } else if ft.is_dir() {
                h.update(b"D");
                subdirs.push(r);
            } else if ft.is_char_device() || ft.is_block_device() {
                h.update(format!("C{}", md.rdev()).as_bytes());
            }
            h.update([0xff]);
        }
        // Reverse so the stack visits subdirectories in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn dir_size(p: &Path) -> u64 {
    anvil_backends::mount::dir_size(p).unwrap_or(0)
}

fn copy_tree(src: &Path, dst: &Path) -> Result<(), String> {
    anvil_backends::mount::copy_tree(src, dst).map_err(|e| e.to_string())
}

fn unpack_tar(tar_path: &Path, dst: &Path) -> Result<(), String> {
    let f = std::fs::File::open(tar_path)
        .map_err(|e| format!("opening {}: {e}", tar_path.display()))?;
    let name = tar_path.to_string_lossy();
    let reader: Box<dyn Read> = if name.ends_with(".gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    std::fs::create_dir_all(dst).map_err(|e| format!("creating {}: {e}", dst.display()))?;
    // `unpack` refuses entries that would land outside `dst`.
    ar.unpack(dst)
        .map_err(|e| format!("unpacking {}: {e}", tar_path.display()))
}

fn host_file(field: &str, p: &Option<String>) -> Result<Option<PathBuf>, OpError> {
    match p {
        None => Ok(None),
        Some(s) => {
            let path = PathBuf::from(s);
            if !path.is_absolute() {
                return Err(OpError::BadRequest(format!(
                    "`{field}` must be an absolute path on the host"
                )));
            }
            if !path.exists() {
                return Err(OpError::BadRequest(format!("`{field}` {s} does not exist")));
            }
            Ok(Some(path))
        }
    }
}

impl Manager {
    pub fn list_templates(&self) -> Vec<TemplateRecord> {
        self.templates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .list()
            .into_iter()
            .cloned()
            .collect()
    }

    pub fn get_template(&self, id: &str) -> Result<TemplateRecord, OpError> {
        self.find_template(id)
            .ok_or_else(|| OpError::not_found(format!("template `{id}` not found")))
    }

    /// Imports a template: copies or unpacks the rootfs under the templates dir, copies VM
    /// files next to it, computes the digest, records it.
    pub async fn import_template(
        self: &Arc<Self>,
        req: TemplateRequest,
    ) -> Result<TemplateRecord, OpError> {
        anvil_core::template::validate_template_name(&req.name)
            .map_err(|e| OpError::BadRequest(format!("`name`: {e}")))?;
        if self.find_template(&req.name).is_some() {
            return Err(OpError::Conflict {
                code: "template_exists",
                message: format!("template `{}` already exists", req.name),
                instance_id: None,
            });
        }
        let rootfs_dir = host_file("rootfs_dir", &req.rootfs_dir)?;
        let rootfs_tar = host_file("rootfs_tar", &req.rootfs_tar)?;
        let kernel = host_file("kernel", &req.kernel)?;
        let initramfs = host_file("initramfs", &req.initramfs)?;
        let rootfs_image = host_file("rootfs_image", &req.rootfs_image)?;
        if rootfs_dir.is_some() && rootfs_tar.is_some() {
            return Err(OpError::BadRequest(
                "give either `rootfs_dir` or `rootfs_tar`, not both".into(),
            ));
        }
        if rootfs_dir.is_none() && rootfs_tar.is_none() && kernel.is_none() {
            return Err(OpError::BadRequest(
                "a template needs `rootfs_dir`, `rootfs_tar` or `kernel` + `rootfs_image`".into(),
            ));
        }
        if kernel.is_some() != rootfs_image.is_some() {
            return Err(OpError::BadRequest(
                "VM templates need both `kernel` and `rootfs_image`".into(),
            ));
        }
        let id = format!("tpl-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let dir = self.cfg.storage_templates_dir().join(&id);
        let tid = id.clone();
        let me = self.clone();
        let name = req.name.clone();
        let backend_hint = req.backend_hint;
        let ready_marker = req.ready_marker.clone();
        let vm = anvil_backends::VmSpec {
            vcpus: req.vcpus.unwrap_or(1),
            memory_bytes: req.memory_mib.unwrap_or(128) << 20,
            boot_args: None,
            enable_vsock: ready_marker.is_none(),
            serial_log: false,
        };
        let built = tokio::task::spawn_blocking(move || -> Result<TemplateRecord, String> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let root = dir.join("rootfs");
            let mut h = Sha256::new();
            let rootfs = match (rootfs_dir, rootfs_tar) {
                (Some(src), _) => {
                    copy_tree(&src, &root)?;
                    Some(root)
                }
                (None, Some(tar)) => {
                    unpack_tar(&tar, &root)?;
                    Some(root)
                }
                _ => None,
            };
            if let Some(r) = &rootfs {
                h.update(
                    tree_digest(r)
                        .map_err(|e| format!("digesting {}: {e}", r.display()))?
                        .as_bytes(),
                );
            }
            let mut copy_file = |src: Option<PathBuf>,
                                 name: &str|
             -> Result<Option<PathBuf>, String> {
                let Some(src) = src else { return Ok(None) };
                let to = dir.join(name);
                std::fs::copy(&src, &to).map_err(|e| format!("copying {}: {e}", src.display()))?;
                let bytes =
                    std::fs::read(&to).map_err(|e| format!("reading {}: {e}", to.display()))?;
                h.update(name.as_bytes());
                h.update(Sha256::digest(&bytes));
                Ok(Some(to))
            };
            let kernel = copy_file(kernel, "vmlinux")?;
            let initramfs = copy_file(initramfs, "initramfs")?;
            let rootfs_image = copy_file(rootfs_image, "rootfs.img")?;
            let digest = format!("sha256:{}", hex::encode(h.finalize()));
            Ok(TemplateRecord {
                id: tid,
                name,
                backend_hint,
                image_digest: digest,
                size_bytes: dir_size(&dir),
                rootfs_dir: rootfs,
                rootfs_image,
                kernel,
                initramfs,
                snapshot_dir: None,
                ready_marker,
                status: TemplateStatus::Ready,
                created_at: rfc3339(now_ms()),
            })
        })
        .await
        .map_err(OpError::internal)?;
        let dir = me.cfg.storage_templates_dir().join(&id);
        let mut rec = match built {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(OpError::Unprocessable {
                    code: "template_import_failed",
                    message: e,
                    instance_id: None,
                });
            }
        };
        me.prepare_vm_template(&mut rec, &vm, &dir).await;
        if let Err(e) = me.store.put_template(&rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(OpError::internal(e));
        }
        if let Err(e) = me
            .templates
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.clone())
        {
            let _ = me.store.delete_template(&rec.id);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(OpError::Conflict {
                code: "template_exists",
                message: e.to_string(),
                instance_id: None,
            });
        }
        info!(template = %rec.name, id = %rec.id, digest = %rec.image_digest, "template imported");
        me.wake_pools.notify_one();
        Ok(rec)
    }

    /// A VM template gets its boot snapshot from the Firecracker backend. If that fails, the
    /// template is marked failed with the reason: the selector then treats firecracker as
    /// unavailable for it, while a namespace backend can still use its rootfs directory.
    async fn prepare_vm_template(
        &self,
        rec: &mut TemplateRecord,
        vm: &anvil_backends::VmSpec,
        dir: &Path,
    ) {
        if rec.kernel.is_none() {
            return;
        }
        let Some(fc) = self
            .registry
            .get(anvil_core::backend::BackendKind::Firecracker)
        else {
            return;
        };
        let files = crate::manager::template_files(rec);
        match fc.prepare_template(&files, vm, dir).await {
            Ok(snap) => {
                rec.snapshot_dir = snap;
                info!(template = %rec.name, "VM boot snapshot prepared");
            }
            Err(e) => {
                tracing::warn!(template = %rec.name, error = %e, "VM boot snapshot failed; template marked failed for firecracker");
                rec.status = TemplateStatus::Failed {
                    reason: format!("boot snapshot: {e}"),
                };
            }
        }
        rec.size_bytes = dir_size(dir);
    }

    /// Imports each `[[template.preload]]` whose name is not registered yet. A failure is
    /// logged and leaves the daemon running (other templates and backends still serve).
    pub async fn preload_templates(self: &Arc<Self>) {
        for p in self.cfg.template.preload.clone() {
            if self.find_template(&p.name).is_some() {
                continue;
            }
            let req = TemplateRequest {
                name: p.name.clone(),
                rootfs_dir: Some(p.rootfs_dir.to_string_lossy().into_owned()),
                rootfs_tar: None,
                kernel: None,
                initramfs: None,
                rootfs_image: None,
                backend_hint: None,
                ready_marker: None,
                vcpus: None,
                memory_mib: None,
            };
            match self.import_template(req).await {
                Ok(t) => info!(template = %t.name, id = %t.id, "preloaded template"),
                Err(e) => {
                    tracing::error!(template = %p.name, rootfs_dir = %p.rootfs_dir.display(), error = %e, "[[template.preload]] failed (build it with scripts/setup.sh)")
                }
            }
        }
    }

    /// Template ids referenced by live instances or by checkpoints.
    fn templates_in_use(&self) -> HashSet<String> {
        let mut used = HashSet::new();
        for s in self.all_slots() {
            // A locked record is busy, hence live: count its template from the spec snapshot.
            match s.rec.try_lock() {
                Ok(r) if r.instance.state == SandboxState::Destroyed => {}
                Ok(r) => used.extend(r.instance.template.clone()),
                Err(_) => used.extend(s.template_hint.clone()),
            }
        }
        for c in self
            .checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if let Some(t) = &c.checkpoint.template {
                used.insert(t.clone());
            }
        }
        used
    }

    pub fn delete_template(&self, id_or_name: &str) -> Result<(), OpError> {
        let t = self.get_template(id_or_name)?;
        if self.templates_in_use().contains(&t.id) {
            return Err(OpError::Conflict {
                code: "template_in_use",
                message: format!("template `{}` is used by instances or checkpoints", t.name),
                instance_id: None,
            });
        }
        self.remove_template(&t)
    }

    fn remove_template(&self, t: &TemplateRecord) -> Result<(), OpError> {
        self.store
            .delete_template(&t.id)
            .map_err(OpError::internal)?;
        self.templates
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&t.id);
        let dir = self.cfg.storage_templates_dir().join(&t.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| OpError::internal(format!("removing {}: {e}", dir.display())))?;
        }
        Ok(())
    }

    /// Removes templates nothing uses or names (instances, checkpoints, policies, the default)
    /// and directories under the templates dir that no template owns.
    pub fn gc_templates(&self) -> Result<TemplateGcResponse, OpError> {
        let used = self.templates_in_use();
        let policies = self.policies.load();
        let named: HashSet<String> = policies
            .policies()
            .iter()
            .flat_map(|p| p.select.templates.iter().cloned())
            .chain(self.cfg.template.default.clone())
            .collect();
        let mut removed = Vec::new();
        let mut freed = 0;
        for t in self.list_templates() {
            if used.contains(&t.id) || named.contains(&t.name) || named.contains(&t.id) {
                continue;
            }
            freed += t.size_bytes;
            self.remove_template(&t)?;
            removed.push(t.id.clone());
        }
        let known: HashSet<String> = self.list_templates().into_iter().map(|t| t.id).collect();
        if let Ok(rd) = std::fs::read_dir(self.cfg.storage_templates_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !known.contains(&name) {
                    freed += dir_size(&e.path());
                    let _ = std::fs::remove_dir_all(e.path());
                    removed.push(name);
                }
            }
        }
        Ok(TemplateGcResponse {
            removed,
            freed_bytes: freed,
        })
    }
}
