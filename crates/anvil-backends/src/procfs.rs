//! Small readers of `/proc` shared by backends.

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`), used to
/// tell a live process from a reused pid.
pub fn pid_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3 (state); field 22 is index 19 here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is alive and is the same process that had `start_time`.
pub fn same_process(pid: i32, start_time: u64) -> bool {
    pid_start_time(pid) == Some(start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let me = std::process::id() as i32;
        let t = pid_start_time(me).expect("own stat");
        assert!(same_process(me, t));
        assert!(!same_process(me, t + 1));
        assert_eq!(pid_start_time(i32::MAX), None);
    }
}
