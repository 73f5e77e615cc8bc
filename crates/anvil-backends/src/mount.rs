//! Mount helpers: the overlay root of namespace sandboxes, unmounting, mount lookup, and
//! copying/measuring upper layers for checkpoints and forks.

use crate::cgroup::detect::parse_line;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {target}: {errno}")]
    Sys {
        op: &'static str,
        target: String,
        errno: Errno,
    },
    #[error("path {0} cannot be used in overlay options (contains `,`, `:` or `\\`)")]
    BadPath(String),
    #[error("copy {src} -> {dst} failed ({status}): {stderr}")]
    Copy {
        src: String,
        dst: String,
        status: String,
        stderr: String,
    },
}

fn io(context: impl Into<String>, source: std::io::Error) -> MountError {
    MountError::Io {
        context: context.into(),
        source,
    }
}

/// Mounts an overlay of `lower` (read-only) and `upper`/`work` (writable, same filesystem)
/// on `target`. bubblewrap 0.8 has no `--overlay`, so the daemon mounts it on the host and
/// binds it as the sandbox's `/`.
pub fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), MountError> {
    for p in [lower, upper, work] {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            return Err(MountError::BadPath(s.into_owned()));
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|errno| MountError::Sys {
        op: "mount overlay on",
        target: format!("{} ({opts})", target.display()),
        errno,
    })
}

/// Unmounts `target`; falls back to a lazy detach if it is busy. Idempotent: a target that
/// is not mounted (or does not exist) is fine.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    // Loop: a crash between two mounts can leave the same target mounted more than once.
    for _ in 0..8 {
        if !is_mounted(target)? {
            return Ok(());
        }
        unmount_once(target)?;
    }
    if is_mounted(target)? {
        return Err(MountError::Sys {
            op: "umount (still mounted after repeated unmounts)",
            target: target.display().to_string(),
            errno: Errno::EBUSY,
        });
    }
    Ok(())
}

fn unmount_once(target: &Path) -> Result<(), MountError> {
    match nix::mount::umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => {
            tracing::warn!(target = %target.display(), "mount busy, detaching lazily");
            nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(|errno| MountError::Sys {
                op: "umount (detach)",
                target: target.display().to_string(),
                errno,
            })
        }
        Err(errno) => Err(MountError::Sys {
            op: "umount",
            target: target.display().to_string(),
            errno,
        }),
    }
}

/// Whether something is mounted exactly at `target` in this mount namespace.
pub fn is_mounted(target: &Path) -> Result<bool, MountError> {
    let want = canonical_or_same(target);
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io("read /proc/self/mountinfo", e))?;
    Ok(text
        .lines()
        .filter_map(parse_line)
        .any(|m| m.mount_point == want))
}

/// Every mount point at or below `dir` (to assert nothing of an instance is left mounted).
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let dir = canonical_or_same(dir);
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io("read /proc/self/mountinfo", e))?;
    Ok(text
        .lines()
        .filter_map(parse_line)
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect())
}

fn canonical_or_same(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Copies the tree `src` into `dst` (created if missing) preserving modes, owners,
/// timestamps, symlinks, hard links, xattrs (`trusted.overlay.*`) and device nodes (overlay
/// whiteouts are 0/0 character devices). Reflinks where the filesystem supports them.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(dst).map_err(|e| io(format!("create {}", dst.display()), e))?;
    let mut from = src.as_os_str().to_owned();
    from.push("/.");
    let out = Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(&from)
        .arg(dst)
        .output()
        .map_err(|e| io("run cp", e))?;
    if !out.status.success() {
        return Err(MountError::Copy {
            src: src.display().to_string(),
            dst: dst.display().to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Apparent size in bytes of everything under `path` (files and symlinks; not following
/// symlinks, not crossing into other filesystems).
pub fn dir_size(path: &Path) -> Result<u64, MountError> {
    use std::os::unix::fs::MetadataExt;
    let root =
        std::fs::symlink_metadata(path).map_err(|e| io(format!("stat {}", path.display()), e))?;
    let dev = root.dev();
    let mut total = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| io(format!("read dir {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io(format!("read dir {}", dir.display()), e))?;
            let md = entry
                .metadata()
                .map_err(|e| io(format!("stat {}", entry.path().display()), e))?;
            if md.is_dir() {
                if md.dev() == dev {
                    stack.push(entry.path());
                }
            } else {
                total += md.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn dir_size_sums_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![0u8; 24]).unwrap();
        assert_eq!(dir_size(d.path()).unwrap(), 1024);
        assert!(dir_size(&d.path().join("missing")).is_err());
    }

    #[test]
    fn copy_tree_keeps_modes_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/secret"), "x").unwrap();
        std::fs::set_permissions(
            src.join("etc/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("etc/secret", src.join("link")).unwrap();
        let dst = d.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        assert_eq!(
            std::fs::metadata(dst.join("etc/secret")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            PathBuf::from("etc/secret")
        );
        // Copying into an existing tree merges.
        copy_tree(&src, &dst).unwrap();
        let err = copy_tree(&d.path().join("nope"), &dst)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn overlay_paths_with_separators_are_rejected() {
        let p = Path::new("/tmp/a,b");
        assert!(matches!(
            mount_overlay(p, p, p, p),
            Err(MountError::BadPath(_))
        ));
    }

    #[test]
    fn unmount_of_unmounted_dir_is_ok() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mounted(d.path()).unwrap());
        unmount(d.path()).unwrap();
        unmount(&d.path().join("missing")).unwrap();
        assert!(is_mounted(Path::new("/proc")).unwrap());
    }
}
