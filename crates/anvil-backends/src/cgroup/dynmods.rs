//! `favordynmods` on the cgroup2 mount.
//!
//! Moving a process into a cgroup takes the kernel's global `cgroup_threadgroup_rwsem` for
//! writing, and a percpu rwsem waits for an RCU grace period before its first writer after a
//! quiet spell: 5-20 ms on a 2-vCPU VM, paid by every sandbox start that is not right behind
//! another one (measured: docs/benchmarks.md). The cgroup2 mount option `favordynmods`
//! (Linux >= 6.0) keeps that rwsem in its writer-friendly mode, so a migration costs
//! microseconds; in exchange fork and exit take a slightly slower read path. The flag is
//! global (it also speeds up migrations into v1 hierarchies on hybrid hosts) and stays set
//! until the hierarchy is remounted without it.

use super::detect::{parse_line, MountLine};
use super::CgroupError;
use nix::mount::MsFlags;
use std::path::Path;

const OPTION: &str = "favordynmods";

/// What [`enable`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dynmods {
    /// The mount already had the option.
    AlreadyOn,
    /// The mount was remounted with it.
    Enabled,
}

/// Whether the cgroup2 mount at `mount_point` has `favordynmods` (None: not a cgroup2 mount).
pub fn is_on(mount_point: &Path) -> Option<bool> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    find(&text, mount_point).map(|m| has_option(m.super_opts))
}

/// Remounts the cgroup2 hierarchy at `mount_point` with `favordynmods`, keeping its per-mount
/// flags and its other superblock options (a cgroup2 reconfigure resets what it is not given).
pub fn enable(mount_point: &Path) -> Result<Dynmods, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| CgroupError::io("read /proc/self/mountinfo", e))?;
    let m = find(&text, mount_point).ok_or_else(|| {
        CgroupError::Unusable(format!("{} is not a cgroup2 mount", mount_point.display()))
    })?;
    if has_option(m.super_opts) {
        return Ok(Dynmods::AlreadyOn);
    }
    let (flags, data) = remount_args(m.mount_opts, m.super_opts);
    nix::mount::mount(
        None::<&str>,
        mount_point,
        None::<&str>,
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| {
        CgroupError::io(
            format!("remount {} with {OPTION}", mount_point.display()),
            e.into(),
        )
    })?;
    // A kernel without the option rejects it above; one in a non-initial cgroup namespace
    // accepts the remount and ignores the flag: check.
    match is_on(mount_point) {
        Some(true) => Ok(Dynmods::Enabled),
        _ => Err(CgroupError::Unusable(format!(
            "the kernel accepted the remount of {} but did not set {OPTION} (not in the initial cgroup namespace?)",
            mount_point.display()
        ))),
    }
}

fn find<'a>(mountinfo: &'a str, mount_point: &Path) -> Option<MountLine<'a>> {
    mountinfo
        .lines()
        .filter_map(parse_line)
        .rfind(|m| m.fstype == "cgroup2" && m.mount_point == mount_point)
}

fn has_option(super_opts: &str) -> bool {
    super_opts.split(',').any(|o| o == OPTION)
}

/// mount(2) flags that keep the per-mount options, and the superblock options plus ours.
fn remount_args(mount_opts: &str, super_opts: &str) -> (MsFlags, String) {
    let mut flags = MsFlags::MS_REMOUNT;
    for o in mount_opts.split(',') {
        flags |= match o {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            _ => MsFlags::empty(),
        };
    }
    let mut data: Vec<&str> = super_opts
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
        .collect();
    data.push(OPTION);
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,favordynmods
42 31 0:39 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn keeps_mount_flags_and_superblock_options() {
        let m = find(INFO, Path::new("/sys/fs/cgroup")).unwrap();
        assert!(!has_option(m.super_opts));
        let (flags, data) = remount_args(m.mount_opts, m.super_opts);
        assert_eq!(
            flags,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_RELATIME
        );
        assert_eq!(data, "nsdelegate,memory_recursiveprot,favordynmods");
    }

    #[test]
    fn finds_only_cgroup2_mounts_and_sees_the_option() {
        let m = find(INFO, Path::new("/sys/fs/cgroup/unified")).unwrap();
        assert!(has_option(m.super_opts));
        assert!(find(INFO, Path::new("/sys/fs/cgroup/memory")).is_none());
        assert!(find(INFO, Path::new("/nowhere")).is_none());
    }
}
