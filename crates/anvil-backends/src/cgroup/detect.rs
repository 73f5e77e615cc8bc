//! Finding the cgroup hierarchies: from `/proc/self/mountinfo`, or from a base directory laid
//! out like `/sys/fs/cgroup` (tests use a fake tree in a tempdir).

use super::{CgroupError, Mode, V1_CONTROLLERS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the hierarchies this module uses are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub mode: Mode,
    /// v1 controller name → mount point (a controller may share a mount, e.g. `cpu,cpuacct`).
    pub v1: BTreeMap<String, PathBuf>,
    /// The cgroup2 mount (pure v2: the whole tree; hybrid: the controller-less unified mount).
    pub unified: Option<PathBuf>,
}

/// Reads `/proc/self/mountinfo` and derives the layout.
pub fn from_proc() -> Result<Layout, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| CgroupError::io("read /proc/self/mountinfo", e))?;
    from_mountinfo(&text)
}

/// Derives the layout from mountinfo text.
pub fn from_mountinfo(text: &str) -> Result<Layout, CgroupError> {
    let mut v1 = BTreeMap::new();
    let mut unified = None;
    for line in text.lines() {
        let Some(m) = parse_line(line) else { continue };
        match m.fstype {
            "cgroup" => {
                for opt in m.super_opts.split(',') {
                    if V1_CONTROLLERS.contains(&opt) {
                        v1.entry(opt.to_string())
                            .or_insert_with(|| m.mount_point.clone());
                    }
                }
            }
            "cgroup2" => {
                // Prefer the conventional location when several cgroup2 mounts exist.
                let conventional = m.mount_point == Path::new("/sys/fs/cgroup")
                    || m.mount_point == Path::new("/sys/fs/cgroup/unified");
                if unified.is_none() || conventional {
                    unified = Some(m.mount_point.clone());
                }
            }
            _ => {}
        }
    }
    classify(v1, unified)
}

/// Derives the layout from a directory shaped like `/sys/fs/cgroup`: `cgroup.controllers`
/// at its top means pure v2; `memory/`, `pids/`, ... subdirectories mean v1, plus `unified/`
/// with a `cgroup.controllers` file for hybrid.
pub fn from_base(base: &Path) -> Result<Layout, CgroupError> {
    if base.join("cgroup.controllers").is_file() {
        return classify(BTreeMap::new(), Some(base.to_path_buf()));
    }
    let mut v1 = BTreeMap::new();
    for ctrl in V1_CONTROLLERS {
        let dir = base.join(ctrl);
        if dir.is_dir() {
            v1.insert(ctrl.to_string(), dir);
        }
    }
    let unified_dir = base.join("unified");
    let unified = unified_dir
        .join("cgroup.controllers")
        .is_file()
        .then_some(unified_dir);
    classify(v1, unified)
}

fn classify(
    v1: BTreeMap<String, PathBuf>,
    unified: Option<PathBuf>,
) -> Result<Layout, CgroupError> {
    if !v1.is_empty() {
        let missing: Vec<_> = V1_CONTROLLERS
            .iter()
            .filter(|c| !v1.contains_key(**c))
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::Unusable(format!(
                "cgroup v1 controllers missing: {missing:?} (found {:?})",
                v1.keys().collect::<Vec<_>>()
            )));
        }
        let mode = if unified.is_some() {
            Mode::Hybrid
        } else {
            Mode::V1
        };
        return Ok(Layout { mode, v1, unified });
    }
    match unified {
        Some(dir) => {
            let controllers =
                std::fs::read_to_string(dir.join("cgroup.controllers")).map_err(|e| {
                    CgroupError::io(format!("read {}/cgroup.controllers", dir.display()), e)
                })?;
            let have: Vec<&str> = controllers.split_whitespace().collect();
            let missing: Vec<_> = ["memory", "pids", "cpu"]
                .into_iter()
                .filter(|c| !have.contains(c))
                .collect();
            if !missing.is_empty() {
                return Err(CgroupError::Unusable(format!(
                    "cgroup v2 at {} lacks controllers {missing:?} (has {have:?})",
                    dir.display()
                )));
            }
            Ok(Layout {
                mode: Mode::V2,
                v1: BTreeMap::new(),
                unified: Some(dir),
            })
        }
        None => Err(CgroupError::Unusable(
            "no cgroup hierarchy is mounted".into(),
        )),
    }
}

/// One parsed mountinfo line (only what we need).
pub(crate) struct MountLine<'a> {
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,noexec,relatime`).
    pub mount_opts: &'a str,
    pub fstype: &'a str,
    pub super_opts: &'a str,
}

/// Parses `id parent maj:min root mount_point opts [optional...] - fstype source super_opts`.
pub(crate) fn parse_line(line: &str) -> Option<MountLine<'_>> {
    let (pre, post) = line.split_once(" - ")?;
    let mut pre = pre.split(' ');
    let mount_point = unescape(pre.nth(4)?);
    let mount_opts = pre.next()?;
    let mut post = post.split(' ');
    let fstype = post.next()?;
    let _source = post.next()?;
    let super_opts = post.next().unwrap_or("");
    Some(MountLine {
        mount_point: PathBuf::from(mount_point),
        mount_opts,
        fstype,
        super_opts,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
pub(crate) fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_layout() {
        let l = from_mountinfo(HYBRID).unwrap();
        assert_eq!(l.mode, Mode::Hybrid);
        assert_eq!(l.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(l.v1["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(l.unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn v1_with_shared_cpu_mount() {
        let text = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:1 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
        let l = from_mountinfo(text).unwrap();
        assert_eq!(l.mode, Mode::V1);
        assert_eq!(l.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(l.unified, None);
    }

    #[test]
    fn v1_missing_controller_is_unusable() {
        let text = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let err = from_mountinfo(text).unwrap_err().to_string();
        assert!(err.contains("pids"), "{err}");
    }

    #[test]
    fn nothing_mounted_is_unusable() {
        assert!(from_mountinfo("22 1 0:5 / /proc rw - proc proc rw\n").is_err());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn base_dir_v2_requires_controllers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let l = from_base(dir.path()).unwrap();
        assert_eq!(l.mode, Mode::V2);
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset io\n").unwrap();
        let err = from_base(dir.path()).unwrap_err().to_string();
        assert!(err.contains("memory"), "{err}");
    }
}
