//! Reliability (issue 5): soak. Many create → exec → destroy cycles of real bubblewrap
//! sandboxes (two clients at once), then: the daemon's open fds and RSS are back near where
//! they were after warm-up, and nothing is left — mounts, cgroups, instance dirs, processes.
//!
//! Ignored by default (minutes); run with
//! `ANVIL_SOAK_CYCLES=200 cargo test -p anvil --test rel_soak -- --ignored --nocapture`
//! (default 2000 cycles).
mod bwrap_support;
mod common;

use bwrap_support::*;
use serde_json::json;
use std::time::{Duration, Instant};

const CLASS: &str = "soak";
const WARMUP: usize = 20;
const CLIENTS: usize = 2;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// One create → exec → destroy cycle; panics with the step that failed.
fn cycle(bw: &Bw, n: usize) {
    let r = bw.d.post(
        "/v1/instances",
        json!({"workload_class": CLASS, "labels": {"cycle": n.to_string()}}),
    );
    assert_eq!(r.status, 201, "cycle {n}: create: {}", r.text());
    let id = r.json()["instance"]["id"].as_str().unwrap().to_string();
    let r = bw.d.post(
        &format!("/v1/instances/{id}/exec"),
        json!({"cmd": ["/bin/sh", "-c", "echo $((6*7))"], "timeout_ms": 10000}),
    );
    assert_eq!(r.status, 200, "cycle {n}: exec: {}", r.text());
    assert_eq!(r.json()["stdout"], "42\n", "cycle {n}: exec output");
    let r = bw.d.delete(&format!("/v1/instances/{id}"));
    assert_eq!(r.status, 200, "cycle {n}: destroy: {}", r.text());
}

fn run_cycles(bw: &Bw, total: usize) -> Duration {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            s.spawn(move || {
                let mut n = c;
                while n < total {
                    cycle(bw, n);
                    n += CLIENTS;
                }
            });
        }
    });
    t0.elapsed()
}

#[test]
#[ignore = "soak: minutes of sandbox churn; run with --ignored (ANVIL_SOAK_CYCLES, default 2000)"]
fn soak_create_exec_destroy_leaks_nothing() {
    let cycles: usize = std::env::var("ANVIL_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let Some(bw) = Bw::start(vec![(
        "soak.toml",
        bwrap_policy(
            CLASS,
            "[pool]\nenabled = false\nreset_mode = \"overlayfs-rollback\"\n",
        ),
    )]) else {
        return;
    };
    let pid = bw.d.pid().unwrap();
    run_cycles(&bw, WARMUP);
    let (fd0, rss0) = (fd_count(pid), rss_kib(pid));
    let took = run_cycles(&bw, cycles);
    let (fd1, rss1) = (fd_count(pid), rss_kib(pid));
    let per = took / cycles.max(1) as u32;
    eprintln!(
        "SOAK: {cycles} cycles (create+exec+destroy, {CLIENTS} clients) in {took:.1?} ({per:.1?}/cycle); daemon fds {fd0} -> {fd1}; VmRSS {rss0} KiB -> {rss1} KiB"
    );
    // Leftovers, counted on the host.
    let dirs = std::fs::read_dir(bw.instances_dir()).unwrap().count();
    let cgroups: usize = bw
        .root_dirs()
        .iter()
        .map(|r| {
            std::fs::read_dir(r)
                .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
                .unwrap_or(0)
        })
        .sum();
    let dir = bw.d.dir.path().to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir))
        .count();
    // The daemon itself mentions the dir (its --config); everything else is a leftover.
    let procs = processes_mentioning(&dir)
        .into_iter()
        .filter(|(p, _)| *p != pid as i32)
        .count()
        + bw.agents_in_root().len();
    eprintln!("SOAK: leftovers: instance dirs {dirs}, cgroups {cgroups}, mounts {mounts}, processes {procs}");
    assert_eq!(
        (dirs, cgroups, mounts, procs),
        (0, 0, 0, 0),
        "leftovers after {cycles} cycles"
    );
    assert!(
        fd1 <= fd0 + 8,
        "daemon fds grew from {fd0} to {fd1} over {cycles} cycles"
    );
    // Destroyed records are kept as tombstones (up to 1000, an hour), which costs some memory.
    assert!(
        rss1 <= rss0 * 2 + 32 * 1024,
        "daemon RSS grew from {rss0} KiB to {rss1} KiB over {cycles} cycles"
    );
    bw.finish();
}
