//! Small host helpers.

use std::path::Path;

/// Whether anything is mounted at or below `dir` (from /proc/self/mountinfo).
pub fn has_mounts_under(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let prefix = dir.to_string_lossy().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == prefix || mp.starts_with(&format!("{prefix}/")))
}

/// (total, available) memory in bytes from /proc/meminfo.
pub fn meminfo() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The cgroup layout of this host, for `/v1/host` and `doctor`.
pub fn cgroup_mode() -> &'static str {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "unknown";
    };
    let v2_root = info
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "));
    let v1 = info.lines().any(|l| l.contains(" - cgroup "));
    let v2 = info.lines().any(|l| l.contains(" - cgroup2 "));
    match (v2_root, v1, v2) {
        (true, _, _) => "v2",
        (false, true, true) => "hybrid",
        (false, true, false) => "v1",
        _ => "none",
    }
}
