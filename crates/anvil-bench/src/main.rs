//! anvil-bench: drives an anvil daemon over its Unix socket with N keep-alive clients and
//! measures, in the same run, the raw mechanisms underneath (bwrap, Firecracker's API,
//! runsc, runc). Prints a table (figures, baselines, ratios, issue-6 targets) and JSON.

mod baselines;
mod client;
mod daemon;
mod error;
mod report;
mod scenarios;
mod stats;

use clap::Parser;
use daemon::{Assets, Daemon, CLASS_COLD, CLASS_RECREATE, CLASS_VM, CLASS_WARM};
use error::{Context, Error, Result};
use report::Report;
use scenarios::Target;
use stats::{Budget, Run};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(version, about = "anvil load generator with same-run raw baselines")]
struct Args {
    /// Short budgets (the whole suite in under a minute) for development.
    #[arg(long)]
    quick: bool,
    /// `[pool].vmm_spares` of the daemon the bench starts: pre-started Firecracker
    /// processes that restores take (0 = every restore spawns its VMM).
    #[arg(long, default_value_t = 1)]
    vmm_spares: u32,
    /// Concurrent clients for the throughput measurements (latency ones use 1).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Use the daemon listening here instead of starting one (it needs the bench policies:
    /// see --write-policies).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The anvil binary (default: next to anvil-bench).
    #[arg(long)]
    anvil: Option<PathBuf>,
    /// The static guest agent (default: <target>/x86_64-unknown-linux-gnu/release/anvil-agent).
    #[arg(long, env = "ANVIL_AGENT_BIN")]
    agent: Option<PathBuf>,
    /// Repository root (scripts, guest sources, .cache/bench).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Only these groups: bwrap, cold, warm, exec, files, reset, fc, get, rss, oci.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave Firecracker out even when it is available.
    #[arg(long)]
    no_vm: bool,
    /// Request rate of the paced GET /v1/instances/{id} measurement.
    #[arg(long, default_value_t = 1000)]
    get_rate: u32,
    /// Seconds per measurement (default 6, quick 1).
    #[arg(long)]
    secs: Option<f64>,
    /// Sandboxes held for the loaded-RSS figure (default 100, quick 20).
    #[arg(long)]
    rss_sandboxes: Option<usize>,
    /// Copy the log of the daemon the bench started to this file.
    #[arg(long)]
    daemon_log: Option<PathBuf>,
    /// Write the bench's policy files into DIR (for a daemon used through --socket) and exit.
    #[arg(long)]
    write_policies: Option<PathBuf>,
}

/// Budgets of one run.
#[derive(Clone, Copy)]
struct Profile {
    secs: f64,
    max_ops: usize,
    warmup: usize,
    rss_sandboxes: usize,
}

impl Profile {
    fn budget(&self) -> Budget {
        Budget {
            max_ops: self.max_ops,
            max_time: Duration::from_secs_f64(self.secs),
            warmup: self.warmup,
        }
    }
    /// For slow operations (VM boots): same time, fewer operations.
    fn slow(&self) -> Budget {
        Budget {
            max_ops: self.max_ops.min(200),
            ..self.budget()
        }
    }
}

fn main() {
    let args = Args::parse();
    match real_main(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("anvil-bench: {e}");
            std::process::exit(2);
        }
    }
}

fn repo_root(args: &Args) -> PathBuf {
    args.repo.clone().unwrap_or_else(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        p.canonicalize().unwrap_or(p)
    })
}

/// `anvil` next to this binary; the agent in the static-target dir of the same target dir.
fn default_binaries() -> (Option<PathBuf>, Option<PathBuf>) {
    let Ok(exe) = std::env::current_exe() else {
        return (None, None);
    };
    let Some(dir) = exe.parent() else {
        return (None, None);
    };
    let anvil = dir.join("anvil");
    let agent = dir
        .parent()
        .map(|t| t.join("x86_64-unknown-linux-gnu/release/anvil-agent"));
    (
        anvil.is_file().then_some(anvil),
        agent.filter(|p| p.is_file()),
    )
}

fn real_main(args: Args) -> Result<i32> {
    if let Some(dir) = &args.write_policies {
        std::fs::create_dir_all(dir).ctx(format!("create {}", dir.display()))?;
        let mut files = daemon::policies(true);
        files.push(daemon::warm_policy(args.clients as u32 + 2));
        for (name, text) in files {
            std::fs::write(dir.join(&name), text).ctx(format!("write {name}"))?;
        }
        println!("wrote bench policies to {}", dir.display());
        return Ok(0);
    }
    if args.clients == 0 {
        return Err(Error::msg("--clients must be at least 1"));
    }
    let t_start = Instant::now();
    let profile = if args.quick {
        Profile {
            secs: args.secs.unwrap_or(1.0),
            max_ops: 400,
            warmup: 1,
            rss_sandboxes: args.rss_sandboxes.unwrap_or(20),
        }
    } else {
        Profile {
            secs: args.secs.unwrap_or(6.0),
            max_ops: 5000,
            warmup: 3,
            rss_sandboxes: args.rss_sandboxes.unwrap_or(100),
        }
    };
    let vm_reason = if args.no_vm {
        Some("--no-vm".to_string())
    } else {
        daemon::firecracker_missing()
    };
    let with_vm = vm_reason.is_none();
    let repo = repo_root(&args);
    let (def_anvil, def_agent) = default_binaries();
    let assets = Assets::prepare(
        &repo,
        args.anvil.clone().or(def_anvil),
        args.agent.clone().or(def_agent),
        with_vm,
    )?;

    let mut report = Report {
        mode: if args.quick { "quick" } else { "full" }.into(),
        clients: args.clients,
        machine: machine_info(),
        ..Default::default()
    };
    if let Some(r) = &vm_reason {
        report.skip("firecracker", r.clone());
    }
    let mut d = match &args.socket {
        Some(s) => Daemon::existing(s.clone())?,
        None => Daemon::start(&assets, with_vm, args.vmm_spares)?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .ctx("tokio runtime")?;
    let outcome = rt.block_on(suite(&args, profile, &assets, &d, with_vm, &mut report));
    drop(rt);
    if let Err(e) = &outcome {
        eprintln!("anvil-bench: suite stopped: {e}\n{}", d.log_tail());
    }
    d.stop();
    daemon_log_figures(&d.log_text(), &mut report);
    if let Some(p) = &args.daemon_log {
        std::fs::write(p, d.log_text()).ctx(format!("write {}", p.display()))?;
    }
    report
        .machine
        .insert("load average (end)".into(), loadavg());
    report.wall_secs = t_start.elapsed().as_secs_f64();
    report.evaluate(args.clients);
    print!("{}", report.table());
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report).ctx("encode JSON")?;
        std::fs::write(p, text).ctx(format!("write {}", p.display()))?;
    }
    outcome?;
    let failed = report.skipped.values().any(|w| w.starts_with("FAILED"));
    Ok(i32::from(failed))
}

fn wants(args: &Args, group: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|g| g == group)
}

/// Records a run's series under `prefix.<series>.<suffix>` (suffix omitted when empty).
fn record(report: &mut Report, prefix: &str, suffix: &str, run: &Run, series: &[&'static str]) {
    for s in series {
        let key = if suffix.is_empty() {
            format!("{prefix}.{s}")
        } else {
            format!("{prefix}.{s}.{suffix}")
        };
        match run.summary(s, &key) {
            Ok(sum) => report.add(&key, sum),
            Err(e) => report.skip(&key, format!("FAILED: {e}")),
        }
    }
}

fn fail(report: &mut Report, key: &str, e: Error) {
    report.skip(key, format!("FAILED: {e}"));
}

async fn suite(
    args: &Args,
    p: Profile,
    assets: &Assets,
    d: &Daemon,
    with_vm: bool,
    report: &mut Report,
) -> Result<()> {
    let t = Target {
        socket: Arc::new(d.socket.clone()),
    };
    let n = args.clients;
    let cn = format!("c{n}");
    let mut c = t.client().await?;
    let vm_import = daemon::import_templates(&mut c, assets).await?;
    if let Some(took) = vm_import {
        report.values.insert(
            "anvil.fc.template_import_ms (boot+snapshot)".into(),
            took.as_secs_f64() * 1e3,
        );
    }
    let classes = policy_classes(&mut c).await?;
    let has = |class: &str| classes.iter().any(|c| c == class);
    if !has(CLASS_COLD) {
        return Err(Error(format!(
            "the daemon has no policy for `{CLASS_COLD}`: install the bench policies (anvil-bench --write-policies DIR) or let the bench start its own daemon"
        )));
    }

    if wants(args, "rss") {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match d.rss_kib() {
            Ok(v) => {
                report.values.insert("rss.idle_kib".into(), v as f64);
            }
            Err(e) => fail(report, "rss.idle_kib", e),
        }
        // Right after idle, on a fresh daemon: the growth per sandbox includes first-use
        // allocations (an upper bound); the after-destroy figure shows what stays.
        eprintln!("bench: RSS with {} sandboxes", p.rss_sandboxes);
        rss_group(&t, d, p.rss_sandboxes, n, report).await;
    }

    let lower = assets.rootfs.clone();
    if wants(args, "bwrap") || wants(args, "cold") {
        eprintln!("bench: raw bwrap and cold create (1 client)");
        match baselines::bwrap::raw_true(&lower, 1, p.budget()).await {
            Ok(r) => record(report, "raw", "", &r, &["spawn"]),
            Err(e) => fail(report, "raw.bwrap.c1", e),
        }
        rename(report, "raw.spawn", "raw.bwrap.c1");
        match scenarios::cold_cycle(&t, 1, p.budget()).await {
            Ok(r) => record(
                report,
                "anvil.cold",
                "c1",
                &r,
                &["total", "create", "exec", "destroy"],
            ),
            Err(e) => fail(report, "anvil.cold.total.c1", e),
        }
        match baselines::bwrap::raw_with_overlay(&lower, p.budget()).await {
            Ok(r) => record(
                report,
                "raw.bwrap_overlay",
                "c1",
                &r,
                &["total", "mount", "spawn", "teardown"],
            ),
            Err(e) => fail(report, "raw.bwrap_overlay.total.c1", e),
        }
        rename(report, "raw.bwrap_overlay.total.c1", "raw.bwrap_overlay.c1");
        eprintln!("bench: raw bwrap and cold create ({n} clients)");
        match baselines::bwrap::raw_true(&lower, n, p.budget()).await {
            Ok(r) => record(report, "raw", "", &r, &["spawn"]),
            Err(e) => fail(report, &format!("raw.bwrap.{cn}"), e),
        }
        rename(report, "raw.spawn", &format!("raw.bwrap.{cn}"));
        match scenarios::cold_cycle(&t, n, p.budget()).await {
            Ok(r) => record(report, "anvil.cold", &cn, &r, &["total"]),
            Err(e) => fail(report, &format!("anvil.cold.total.{cn}"), e),
        }
    }

    if wants(args, "warm") {
        eprintln!("bench: warm pool");
        let target = (n + 2) as u32;
        let pdir = d.policies_dir();
        if pdir.is_none() && !has(CLASS_WARM) {
            report.skip(
                "anvil.warm",
                format!("no `{CLASS_WARM}` policy on this daemon"),
            );
        } else {
            match scenarios::enable_pool(&t, pdir.as_deref(), target, Duration::from_secs(60)).await
            {
                Err(e) => fail(report, "anvil.warm", e),
                Ok(()) => {
                    for (clients, suffix) in [(1, "c1".to_string()), (n, cn.clone())] {
                        // Let refills of the previous run settle before measuring.
                        let _ =
                            scenarios::enable_pool(&t, None, target, Duration::from_secs(30)).await;
                        match scenarios::warm_cycle(&t, clients, p.budget()).await {
                            Ok((r, counts)) => {
                                record(
                                    report,
                                    "anvil.warm",
                                    &suffix,
                                    &r,
                                    &["claim", "claim_exec", "reset_return", "cycle"],
                                );
                                report.note(format!(
                                    "warm {suffix}: {} claims served warm, {} not warm, {} returned to the pool",
                                    counts.warm, counts.other, counts.returned
                                ));
                            }
                            Err(e) => fail(report, &format!("anvil.warm.{suffix}"), e),
                        }
                    }
                    // Reset in place on the pooled class, paced at 40/s (a refill keeps up).
                    let _ = scenarios::enable_pool(&t, None, target, Duration::from_secs(30)).await;
                    eprintln!("bench: reset on a pooled class");
                    match scenarios::pooled_reset(&t, p.budget(), Duration::from_millis(25)).await {
                        Ok(r) => {
                            let base = "anvil.reset.overlayfs-rollback.pooled";
                            let mut counts = Vec::new();
                            for (series, key) in [
                                ("reset", base.to_string()),
                                ("swap", format!("{base}.swap")),
                                ("in_place", format!("{base}.in_place")),
                            ] {
                                match r.summary(series, &key) {
                                    Ok(sum) => {
                                        counts.push(format!("{series} {}", sum.n));
                                        report.add(&key, sum);
                                    }
                                    Err(_) => counts.push(format!("{series} 0")),
                                }
                            }
                            report.note(format!(
                                "pooled resets (one per 25 ms): {}",
                                counts.join(", ")
                            ));
                        }
                        Err(e) => fail(report, "anvil.reset.overlayfs-rollback.pooled", e),
                    }
                    if let Err(e) = scenarios::drain_pool(&t).await {
                        fail(report, "anvil.warm.drain", e);
                    }
                }
            }
        }
    }

    if wants(args, "exec") {
        eprintln!("bench: exec");
        for (clients, suffix) in [(1, "c1".to_string()), (n, cn.clone())] {
            match scenarios::exec_loop(&t, clients, p.budget()).await {
                Ok(r) => record(report, "anvil", &suffix, &r, &["exec"]),
                Err(e) => fail(report, &format!("anvil.exec.{suffix}"), e),
            }
        }
    }

    if wants(args, "files") {
        eprintln!("bench: files");
        match scenarios::files_loop(&t, p.budget()).await {
            Ok(r) => record(
                report,
                "anvil.files_1mib",
                "",
                &r,
                &["put", "get", "put_get"],
            ),
            Err(e) => fail(report, "anvil.files_1mib", e),
        }
    }

    if wants(args, "reset") {
        eprintln!("bench: reset");
        for (class, mode) in [
            (CLASS_COLD, "overlayfs-rollback"),
            (CLASS_RECREATE, "full-recreate"),
        ] {
            let key = format!("anvil.reset.{mode}");
            if !has(class) {
                report.skip(&key, format!("no `{class}` policy on this daemon"));
                continue;
            }
            match scenarios::reset_loop(&t, class, p.budget()).await {
                Ok(r) => {
                    record(report, "anvil.tmp", "", &r, &["reset"]);
                    rename(report, "anvil.tmp.reset", &key);
                }
                Err(e) => fail(report, &key, e),
            }
        }
    }

    if wants(args, "fc") {
        match (&assets.guest, with_vm) {
            (Some((kernel, image)), true) => {
                eprintln!("bench: firecracker");
                fc_group(&t, p, kernel, image, has(CLASS_VM), report).await;
            }
            _ => report.skip("fc", "Firecracker not available (see skipped firecracker)"),
        }
    }

    if wants(args, "get") {
        eprintln!("bench: GET under load");
        // The kernel finishes tearing down the previous scenarios' VMs and cgroups (memory
        // freeing, cgroup offlining, RCU callbacks) for a few seconds after them; on two
        // vCPUs that work shows up as API tail latency. Let it finish: this figure is about
        // the daemon's request path.
        tokio::time::sleep(Duration::from_secs(if args.quick { 1 } else { 3 })).await;
        let budget = Budget {
            max_ops: (f64::from(args.get_rate) * p.secs).ceil() as usize,
            ..p.budget()
        };
        match scenarios::get_load(&t, n, args.get_rate, budget).await {
            Ok(r) => {
                record(report, "anvil.tmp", "", &r, &["get"]);
                rename(report, "anvil.tmp.get", "anvil.get.paced");
            }
            Err(e) => fail(report, "anvil.get.paced", e),
        }
        match scenarios::get_load(&t, n, 0, p.budget()).await {
            Ok(r) => {
                record(report, "anvil.tmp", "", &r, &["get"]);
                rename(report, "anvil.tmp.get", "anvil.get.max");
            }
            Err(e) => fail(report, "anvil.get.max", e),
        }
    }

    if wants(args, "oci") {
        eprintln!("bench: runsc / runc");
        match baselines::oci::which("runsc") {
            Some(bin) => match baselines::oci::runsc(&bin, p.slow()).await {
                Ok(r) => {
                    record(report, "raw.tmp", "", &r, &["run"]);
                    rename(report, "raw.tmp.run", "raw.runsc");
                }
                Err(e) => fail(report, "raw.runsc", e),
            },
            None => report.skip(
                "raw.runsc",
                "runsc is not installed (apt-get install runsc... see docs/benchmarks.md)",
            ),
        }
        match baselines::oci::which("runc") {
            Some(bin) => match baselines::oci::runc(&bin, &lower, p.slow()).await {
                Ok(r) => {
                    record(report, "raw.tmp", "", &r, &["run"]);
                    rename(report, "raw.tmp.run", "raw.runc");
                }
                Err(e) => fail(report, "raw.runc", e),
            },
            None => report.skip("raw.runc", "runc is not installed (apt-get install runc)"),
        }
    }
    Ok(())
}

fn rename(report: &mut Report, from: &str, to: &str) {
    if let Some(mut s) = report.results.remove(from) {
        s.name = to.to_string();
        report.results.insert(to.to_string(), s);
    }
}

async fn policy_classes(c: &mut client::Client) -> Result<Vec<String>> {
    let v = c
        .get("/v1/policies")
        .await?
        .expect("list policies", &[200])?
        .json()?;
    let mut out = Vec::new();
    for p in v.as_array().into_iter().flatten() {
        match &p["workload_class"] {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => {
                out.extend(a.iter().filter_map(|x| x.as_str().map(String::from)))
            }
            _ => {}
        }
    }
    Ok(out)
}

async fn fc_group(
    t: &Target,
    p: Profile,
    kernel: &Path,
    image: &Path,
    has_vm: bool,
    report: &mut Report,
) {
    let dir = match tempfile::Builder::new().prefix("anvil-bench-fc-").tempdir() {
        Ok(d) => d,
        Err(e) => return fail(report, "raw.fc", Error(format!("temp dir: {e}"))),
    };
    match baselines::firecracker::raw_boot(dir.path(), kernel, image, p.slow()).await {
        Ok(r) => {
            record(report, "raw.tmp", "", &r, &["boot"]);
            rename(report, "raw.tmp.boot", "raw.fc.boot");
        }
        Err(e) => fail(report, "raw.fc.boot", e),
    }
    match baselines::firecracker::make_snapshot(dir.path(), kernel, image).await {
        Ok(snap) => match baselines::firecracker::raw_load(dir.path(), &snap, p.slow()).await {
            Ok(r) => {
                record(report, "raw.tmp", "", &r, &["load"]);
                rename(report, "raw.tmp.load", "raw.fc.load");
            }
            Err(e) => fail(report, "raw.fc.load", e),
        },
        Err(e) => fail(
            report,
            "raw.fc.load",
            Error(format!("snapshot for the raw load: {e}")),
        ),
    }
    if !has_vm {
        report.skip("anvil.fc", format!("no `{CLASS_VM}` policy on this daemon"));
        return;
    }
    match scenarios::vm_restore(t, p.slow()).await {
        Ok(r) => {
            record(report, "anvil.fc", "", &r, &["create", "destroy"]);
            rename(report, "anvil.fc.create", "anvil.fc.restore");
        }
        Err(e) => fail(report, "anvil.fc.restore", e),
    }
    match scenarios::reset_loop(t, CLASS_VM, p.slow()).await {
        Ok(r) => {
            record(report, "anvil.tmp", "", &r, &["reset"]);
            rename(report, "anvil.tmp.reset", "anvil.reset.mm-template");
        }
        Err(e) => fail(report, "anvil.reset.mm-template", e),
    }
}

async fn rss_group(t: &Target, d: &Daemon, count: usize, clients: usize, report: &mut Report) {
    let before = match d.rss_kib() {
        Ok(v) => v,
        Err(e) => return fail(report, "rss", e),
    };
    report
        .values
        .insert("rss.before_load_kib".into(), before as f64);
    let ids = match scenarios::create_many(t, count, clients).await {
        Ok(ids) => ids,
        Err(e) => return fail(report, "rss.loaded", e),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    match d.rss_kib() {
        Ok(with) => {
            report
                .values
                .insert(format!("rss.with_{count}_sandboxes_kib"), with as f64);
            report.values.insert(
                "rss.per_sandbox_kib".into(),
                (with as f64 - before as f64) / count as f64,
            );
        }
        Err(e) => fail(report, "rss.loaded", e),
    }
    scenarios::destroy_many(t, &ids, clients).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(after) = d.rss_kib() {
        report
            .values
            .insert("rss.after_destroy_kib".into(), after as f64);
    }
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
}

fn machine_info() -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    m.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    );
    let mem = read_trim("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .unwrap_or("")
        .to_string();
    m.insert("memory".into(), mem);
    m.insert("kernel".into(), read_trim("/proc/sys/kernel/osrelease"));
    let cg = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2 (unified)"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "hybrid (v1 controllers, v2 at /sys/fs/cgroup/unified)"
    } else {
        "v1"
    };
    m.insert("cgroup".into(), cg.into());
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "PVM (kvm_pvm)"
    } else if Path::new("/dev/kvm").exists() {
        "hardware"
    } else {
        "none"
    };
    m.insert("kvm".into(), kvm.into());
    m.insert("load average (start)".into(), loadavg());
    m
}

/// Backend-side timings the daemon logs (`took_ms=` of bwrap creates/restarts, `ms=` of
/// instance creates), to split request latency into backend work and the rest.
fn daemon_log_figures(log: &str, report: &mut Report) {
    let log = strip_ansi(log);
    let grab = |needle: &str, field: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| {
                let rest = l.split(field).nth(1)?;
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    for (needle, field, key) in [
        (
            "bwrap sandbox ready",
            "took_ms=",
            "daemon_log.bwrap_create_ms_p50",
        ),
        (
            "bwrap sandbox restarted",
            "took_ms=",
            "daemon_log.bwrap_restart_ms_p50",
        ),
        (
            "firecracker VM ready",
            "ms=",
            "daemon_log.firecracker_ready_ms_p50",
        ),
    ] {
        let mut v = grab(needle, field);
        if v.is_empty() {
            continue;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        report
            .values
            .insert(key.into(), stats::percentile(&v, 50.0));
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`) the daemon's text log may contain.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
