//! The bubblewrap backend end to end: real bwrap, real cgroups, real overlay, the real agent.
//! Every test checks the host after each operation and cleans up even when it fails.
//!
//! Needs root, bwrap and the static agent (env `ANVIL_AGENT_BIN`, else
//! `target/x86_64-unknown-linux-gnu/release/anvil-agent`, built with scripts/build-agent.sh
//! when missing); otherwise each test prints `SKIP: ...` and returns.

use anvil_backends::agent::{AgentClient, ExecRequest};
use anvil_backends::bubblewrap::{BubblewrapBackend, BwrapConfig, BwrapData};
use anvil_backends::cgroup::CgroupConfig;
use anvil_backends::mount::mounts_under;
use anvil_backends::{
    Backend, BackendError, ExitCause, InstanceSpec, Quota, Runtime, TemplateFiles,
};
use anvil_core::backend::{CheckpointKind, ResetMode};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const CGROUP_ROOT: &str = "anvil-test-bwrap";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Agent binary and template rootfs, prepared once per test binary.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    static PRE: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    PRE.get_or_init(|| {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("bubblewrap tests need root".into());
        }
        if !Path::new("/usr/bin/bwrap").is_file() {
            return Err("bwrap not installed (apt-get install bubblewrap)".into());
        }
        let root = workspace_root();
        let agent = match std::env::var_os("ANVIL_AGENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => root.join("target/x86_64-unknown-linux-gnu/release/anvil-agent"),
        };
        if !agent.is_file() {
            let script = root.join("scripts/build-agent.sh");
            if !script.is_file() {
                return Err(format!(
                    "agent binary {} missing and no scripts/build-agent.sh",
                    agent.display()
                ));
            }
            eprintln!("building the agent with {}", script.display());
            let st = Command::new(&script)
                .current_dir(&root)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() || !agent.is_file() {
                return Err(format!(
                    "scripts/build-agent.sh failed ({st}); no agent at {}",
                    agent.display()
                ));
            }
        }
        let template = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("busybox-template");
        let st = Command::new(root.join("scripts/build-busybox-template.sh"))
            .arg(&template)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("build-busybox-template.sh failed: {st}"));
        }
        Ok((agent, template))
    })
    .clone()
}

/// One test's world: backend, state dir, and every runtime it made (destroyed on drop).
struct World {
    backend: Arc<BubblewrapBackend>,
    state: tempfile::TempDir,
    template: PathBuf,
    tag: String,
    live: Mutex<Vec<Runtime>>,
}

impl World {
    fn new(tag: &str) -> Option<World> {
        Self::with_agent(tag, None)
    }

    fn with_agent(tag: &str, agent_override: Option<PathBuf>) -> Option<World> {
        Self::with_cfg(tag, |cfg| {
            if let Some(a) = agent_override {
                cfg.agent = a;
            }
        })
    }

    fn with_cfg(tag: &str, adjust: impl FnOnce(&mut BwrapConfig)) -> Option<World> {
        let (agent, template) = match prerequisites() {
            Ok(p) => p,
            Err(why) => {
                eprintln!("SKIP: {why}");
                return None;
            }
        };
        let mut cfg = BwrapConfig {
            bwrap: "/usr/bin/bwrap".into(),
            agent,
            cgroups: CgroupConfig {
                root_name: CGROUP_ROOT.into(),
                base: None,
            },
            ready_timeout: Duration::from_secs(10),
        };
        adjust(&mut cfg);
        let state = tempfile::Builder::new()
            .prefix("anvil-bw")
            .tempdir()
            .unwrap();
        Some(World {
            backend: Arc::new(BubblewrapBackend::new(cfg)),
            state,
            template,
            tag: format!("{tag}-{}", std::process::id()),
            live: Mutex::new(Vec::new()),
        })
    }

    fn spec(&self, n: u32, quota: Quota) -> InstanceSpec {
        let id = format!("{}-{n}", self.tag);
        InstanceSpec {
            instance_dir: self.state.path().join("instances").join(&id),
            cgroup_name: format!("bwt-{id}"),
            id,
            template: TemplateFiles {
                id: "busybox".into(),
                rootfs_dir: Some(self.template.clone()),
                ..Default::default()
            },
            quota,
            network: false,
            env: [("ANVIL_TEST".to_string(), "1".to_string())].into(),
            vm: None,
            from_checkpoint: None,
        }
    }

    async fn create(&self, spec: &InstanceSpec) -> Runtime {
        let t = Instant::now();
        let rt = self.backend.create(spec).await.unwrap();
        eprintln!("create {} took {:?}", spec.id, t.elapsed());
        self.track(&rt);
        rt
    }

    fn track(&self, rt: &Runtime) {
        self.live.lock().unwrap().push(rt.clone());
    }

    fn client(&self, rt: &Runtime) -> AgentClient {
        AgentClient::new(self.backend.agent_endpoint(rt).unwrap())
            .with_timeout(Duration::from_secs(30))
    }

    async fn sh(&self, rt: &Runtime, script: &str) -> (String, Option<i32>) {
        let req = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout_ms: Some(20_000),
            ..Default::default()
        };
        let out = self
            .client(rt)
            .exec(req, None)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (text, out.exit.exit_code)
    }

    async fn destroy_checked(&self, rt: &Runtime) {
        let data = data(rt);
        self.backend.destroy(rt).await.unwrap();
        assert_host_clean(rt, &data);
        // Idempotent.
        self.backend.destroy(rt).await.unwrap();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let rts = std::mem::take(&mut *self.live.lock().unwrap());
        let backend = self.backend.clone();
        // Drop cannot await: tear down on a fresh runtime in a helper thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for r in rts {
                    if let Err(e) = backend.destroy(&r).await {
                        eprintln!("cleanup destroy failed: {e}");
                    }
                }
            });
        })
        .join();
        // The shared test root is removed once no test uses it any more.
        for ctrl in ["memory", "pids", "cpu", "freezer", "unified"] {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(ctrl).join(CGROUP_ROOT));
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(CGROUP_ROOT));
    }
}

fn data(rt: &Runtime) -> BwrapData {
    serde_json::from_value(rt.data.clone()).unwrap()
}

fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z ") && !s.contains(") X "))
        .unwrap_or(false)
}

/// What SPEC/issue 3 asks after destroy: no process in the cgroup, cgroup dirs removed, no
/// mount of the instance, instance dir removed, bwrap gone.
fn assert_host_clean(rt: &Runtime, d: &BwrapData) {
    assert!(
        d.cgroup.pids().unwrap().is_empty(),
        "processes left in cgroup"
    );
    for dir in d.cgroup.dirs() {
        assert!(!dir.exists(), "cgroup dir {} left", dir.display());
    }
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !text.contains(d.instance_dir.to_str().unwrap()),
        "instance mount left in mountinfo"
    );
    assert!(
        !d.instance_dir.exists(),
        "instance dir {} left",
        d.instance_dir.display()
    );
    if let Some(pid) = rt.pid {
        assert!(
            !running(pid) || anvil_backends::procfs::pid_start_time(pid) != rt.pid_start_time,
            "bwrap {pid} alive"
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || anvil_backends::procfs::pid_start_time(pid) != rt.pid_start_time,
            "bwrap {pid} is an unreaped zombie"
        );
    }
}

fn cgroup_file(d: &BwrapData, ctrl: &str, file: &str) -> String {
    let dir = d
        .cgroup
        .v1
        .get(ctrl)
        .cloned()
        .or_else(|| d.cgroup.unified.clone())
        .unwrap();
    std::fs::read_to_string(dir.join(file)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_files_isolation_destroy() {
    let Some(w) = World::new("basic") else { return };
    let probe = w.backend.probe().await;
    assert!(probe.available, "probe: {probe:?}");
    let spec = w.spec(
        1,
        Quota {
            pids_max: Some(128),
            memory_max: Some(256 << 20),
            ..Default::default()
        },
    );
    let rt = w.create(&spec).await;
    let d = data(&rt);
    // Host: bwrap and the agent are in the sandbox cgroup, the overlay is mounted.
    // bwrap leads its own session (survives the daemon's process group and terminal).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", rt.pid.unwrap())).unwrap();
    let sid = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(3)
        .unwrap();
    assert_eq!(
        sid,
        rt.pid.unwrap().to_string(),
        "bwrap is not a session leader"
    );
    let pids = d.cgroup.pids().unwrap();
    assert!(
        pids.contains(&rt.pid.unwrap()),
        "bwrap {:?} not in cgroup {pids:?}",
        rt.pid
    );
    assert!(pids.len() >= 2, "agent missing from cgroup: {pids:?}");
    assert_eq!(
        mounts_under(&d.instance_dir).unwrap(),
        vec![d.rootfs.clone()]
    );

    let health = w.client(&rt).health().await.unwrap();
    eprintln!("health: {health:?}");
    assert_eq!(w.sh(&rt, "echo hi").await, ("hi\n".to_string(), Some(0)));

    let client = w.client(&rt);
    client
        .write_file("/root/hello.txt", b"from host\n", 0o640)
        .await
        .unwrap();
    assert_eq!(
        client.read_file("/root/hello.txt").await.unwrap(),
        b"from host\n"
    );
    assert_eq!(
        w.sh(&rt, "cat /root/hello.txt; stat -c %a /root/hello.txt")
            .await
            .0,
        "from host\n640\n"
    );
    // The write landed in this instance's upper layer, not in the template.
    assert!(d.upper.join("root/hello.txt").is_file());
    assert!(!w.template.join("root/hello.txt").exists());

    // Isolation: the repo checkout is absent, only loopback, no capabilities, pid 1 is the agent.
    let repo = workspace_root();
    let (out, _) = w
        .sh(
            &rt,
            &format!("test -e {} && echo visible || echo absent", repo.display()),
        )
        .await;
    assert_eq!(out, "absent\n");
    let (out, _) = w
        .sh(&rt, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        .await;
    assert_eq!(out, "lo\n");
    let (out, _) = w.sh(&rt, "grep CapEff /proc/self/status").await;
    assert!(out.contains("0000000000000000"), "{out}");
    let (out, _) = w
        .sh(
            &rt,
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo $ANVIL_TEST; hostname",
        )
        .await;
    assert!(out.starts_with("/run/anvil/anvil-agent "), "{out}");
    assert!(out.contains("\n1\n"), "env not passed: {out}");

    w.destroy_checked(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_stops_at_pids_max() {
    let Some(w) = World::new("bomb") else { return };
    let spec = w.spec(
        1,
        Quota {
            pids_max: Some(40),
            ..Default::default()
        },
    );
    let rt = w.create(&spec).await;
    let d = data(&rt);
    let bomb = {
        let client = w.client(&rt);
        tokio::spawn(async move {
            let req = ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "b(){ b | b & }; b; sleep 3".into(),
                ],
                timeout_ms: Some(10_000),
                ..Default::default()
            };
            // The bomb may make the exec fail to fork; either way it must stay contained.
            if let Ok(s) = client.exec(req, None).await {
                let _ = s.collect().await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut max_events = 0;
    while Instant::now() < deadline {
        let n = d.cgroup.pids().unwrap().len();
        assert!(n <= 40 + 1, "cgroup has {n} processes, over pids_max"); // +1: a racing reader
        let ev = cgroup_file(&d, "pids", "pids.events");
        max_events = ev
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if max_events > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(max_events > 0, "pids.max was never hit");
    let t = Instant::now();
    w.destroy_checked(&rt).await;
    eprintln!("destroy with a fork bomb took {:?}", t.elapsed());
    bomb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_past_memory_max_is_oom_killed() {
    let Some(w) = World::new("oom") else { return };
    let spec = w.spec(
        1,
        Quota {
            memory_max: Some(64 << 20),
            ..Default::default()
        },
    );
    let rt = w.create(&spec).await;
    let backend = w.backend.clone();
    let rt2 = rt.clone();
    let watcher = tokio::spawn(async move { backend.wait_exit(&rt2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !watcher.is_finished(),
        "wait_exit resolved while the sandbox is fine"
    );
    let (out, code) = w
        .sh(
            &rt,
            "dd if=/dev/zero of=/dev/null bs=256M count=1; echo rc=$?",
        )
        .await;
    assert!(!out.contains("rc=0"), "dd survived: {out} {code:?}");
    let cause = tokio::time::timeout(Duration::from_secs(3), watcher)
        .await
        .expect("no OOM noticed")
        .unwrap();
    assert_eq!(cause, ExitCause::OomKilled);
    w.destroy_checked(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_rollback_reverts_files_and_kills_processes() {
    let Some(w) = World::new("reset") else { return };
    let spec = w.spec(1, Quota::default());
    let rt = w.create(&spec).await;
    let (_, code) = w
        .sh(&rt, "echo dirty > /root/state.txt; rm /etc/hostname; setsid sleep 1000 </dev/null >/dev/null 2>&1 &")
        .await;
    assert_eq!(code, Some(0));
    let d = data(&rt);
    let sleeper = wait_for_cmdline(&d, "sleep1000")
        .await
        .expect("background sleep not found in cgroup");

    let t = Instant::now();
    let rt2 = w
        .backend
        .reset(&rt, &spec, ResetMode::OverlayfsRollback)
        .await
        .unwrap();
    eprintln!("reset overlayfs-rollback took {:?}", t.elapsed());
    w.track(&rt2);
    assert!(!running(sleeper), "background process survived reset");
    assert!(!running(rt.pid.unwrap()), "old bwrap survived reset");
    assert_ne!(rt2.pid, rt.pid);
    assert_eq!(data(&rt2).cgroup, d.cgroup, "reset must reuse the cgroup");
    assert!(!d.upper.join("root/state.txt").exists());
    let (out, _) = w
        .sh(&rt2, "cat /root/state.txt 2>&1; cat /etc/hostname")
        .await;
    assert!(out.contains("No such file"), "{out}");
    assert!(out.contains("sandbox\n"), "whiteout survived reset: {out}");

    let err = w
        .backend
        .reset(&rt2, &spec, ResetMode::MmTemplate)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Unsupported { .. }), "{err}");

    let t = Instant::now();
    let rt3 = w
        .backend
        .reset(&rt2, &spec, ResetMode::FullRecreate)
        .await
        .unwrap();
    eprintln!("reset full-recreate took {:?}", t.elapsed());
    w.track(&rt3);
    assert!(!running(rt2.pid.unwrap()));
    assert_eq!(w.sh(&rt3, "echo ok").await.0, "ok\n");
    w.destroy_checked(&rt3).await;
}

async fn wait_for_cmdline(d: &BwrapData, want: &str) -> Option<i32> {
    for _ in 0..100 {
        for pid in d.cgroup.pids().unwrap() {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', "");
            if cmd == want {
                return Some(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_fork_and_rollback() {
    let Some(w) = World::new("ckpt") else { return };
    let spec_a = w.spec(1, Quota::default());
    let a = w.create(&spec_a).await;
    w.sh(
        &a,
        "mkdir -p /data && echo v1 > /data/f.txt && rm /etc/group",
    )
    .await;
    let ckpt = w.state.path().join("checkpoints/c1");
    std::fs::create_dir_all(&ckpt).unwrap();
    let t = Instant::now();
    let out = w.backend.checkpoint(&a, &ckpt).await.unwrap();
    eprintln!(
        "checkpoint took {:?} ({} bytes)",
        t.elapsed(),
        out.size_bytes
    );
    assert_eq!(out.kind, CheckpointKind::Filesystem);
    assert!(out.size_bytes > 0);
    assert_eq!(
        std::fs::read_to_string(ckpt.join("upper/data/f.txt")).unwrap(),
        "v1\n"
    );
    // The sandbox was thawed afterwards.
    assert_eq!(w.sh(&a, "echo alive").await.0, "alive\n");

    let mut spec_b = w.spec(2, Quota::default());
    spec_b.from_checkpoint = Some(ckpt.clone());
    let b = w.create(&spec_b).await;
    assert_eq!(
        w.sh(&b, "cat /data/f.txt; test -e /etc/group && echo group")
            .await
            .0,
        "v1\n"
    );
    // The fork's writes stay its own.
    w.sh(&b, "echo b > /data/f.txt").await;
    assert_eq!(w.sh(&a, "cat /data/f.txt").await.0, "v1\n");

    w.sh(&a, "echo v2 > /data/f.txt; echo extra > /data/g.txt")
        .await;
    let a2 = w.backend.rollback(&a, &spec_a, &ckpt).await.unwrap();
    w.track(&a2);
    assert_eq!(
        w.sh(&a2, "cat /data/f.txt; ls /data").await.0,
        "v1\nf.txt\n"
    );

    w.destroy_checked(&a2).await;
    w.destroy_checked(&b).await;
    assert!(
        ckpt.join("upper/data/f.txt").is_file(),
        "checkpoint must outlive its sandboxes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_a_counter_and_resume_restarts_it() {
    let Some(w) = World::new("pause") else { return };
    let spec = w.spec(1, Quota::default());
    let rt = w.create(&spec).await;
    let d = data(&rt);
    w.sh(&rt, "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/c.tmp; mv /root/c.tmp /root/counter; usleep 20000; done' </dev/null >/dev/null 2>&1 &").await;
    let counter = d.upper.join("root/counter");
    let read = || {
        std::fs::read_to_string(&counter)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The file is replaced by rename, so a read never sees it half-written.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(read() >= 3, "counter not running");

    w.backend.pause(&rt).await.unwrap();
    if d.cgroup.v1.contains_key("freezer") {
        assert_eq!(cgroup_file(&d, "freezer", "freezer.state").trim(), "FROZEN");
    }
    let frozen_at = read();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(read(), frozen_at, "counter moved while paused");

    w.backend.resume(&rt).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(read() > frozen_at, "counter did not restart after resume");
    assert_eq!(w.sh(&rt, "echo up").await.0, "up\n");

    // A checkpoint of a paused sandbox leaves it paused; adoption of a paused one works
    // without asking its (frozen) agent.
    w.backend.pause(&rt).await.unwrap();
    let ckpt = w.state.path().join("ck");
    std::fs::create_dir_all(&ckpt).unwrap();
    w.backend.checkpoint(&rt, &ckpt).await.unwrap();
    assert!(
        d.cgroup.is_frozen().unwrap(),
        "checkpoint thawed a paused sandbox"
    );
    let t = Instant::now();
    assert!(
        w.backend.adopt(&rt).await.unwrap(),
        "paused sandbox not adopted"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "adopt waited on a frozen agent"
    );
    // Destroy straight from paused works too.
    w.destroy_checked(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exit_and_adopt() {
    let Some(w) = World::new("adopt") else { return };
    let spec = w.spec(1, Quota::default());
    let rt = w.create(&spec).await;
    let d = data(&rt);
    assert!(
        w.backend.adopt(&rt).await.unwrap(),
        "live sandbox not adopted"
    );

    // Same pid, different start time: not ours any more → cleaned up.
    let rt_b = w.create(&w.spec(2, Quota::default())).await;
    let mut stale_b = rt_b.clone();
    stale_b.pid_start_time = rt_b.pid_start_time.map(|t| t + 1);
    assert!(!w.backend.adopt(&stale_b).await.unwrap());
    // A daemon restarting would not be bwrap's parent; this test process is, so it reaps.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(rt_b.pid.unwrap()), None);
    assert_host_clean(&rt_b, &data(&rt_b));

    // The sandbox's processes die from outside → wait_exit says Exited; adopt cleans up.
    let backend = w.backend.clone();
    let rt2 = rt.clone();
    let watcher = tokio::spawn(async move { backend.wait_exit(&rt2).await });
    for pid in d.cgroup.pids().unwrap() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let t = Instant::now();
    let cause = tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("exit not noticed")
        .unwrap();
    eprintln!("exit noticed after {:?}", t.elapsed());
    assert_eq!(cause, ExitCause::Exited);
    assert!(!w.backend.adopt(&rt).await.unwrap(), "dead sandbox adopted");
    assert_host_clean(&rt, &d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_create_leaves_nothing() {
    // An "agent" that cannot run in the sandbox: bwrap exits before any ready notification.
    let Some(w) = World::with_agent("fail", Some(PathBuf::from("/bin/true"))) else {
        return;
    };
    let missing =
        World::with_agent("fail2", Some(PathBuf::from("/nonexistent/anvil-agent"))).unwrap();
    let probe = missing.backend.probe().await;
    assert!(!probe.available);
    assert!(
        probe.reason.unwrap().contains("agent"),
        "probe reason should name the agent"
    );
    let spec = w.spec(1, Quota::default());
    let t = Instant::now();
    let err = w.backend.create(&spec).await.unwrap_err();
    eprintln!("failed create took {:?}: {err}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "failure should be noticed without waiting for the timeout"
    );
    let msg = err.to_string();
    assert!(matches!(err, BackendError::Spawn(_)), "{msg}");
    assert!(msg.contains("console:"), "{msg}");
    assert!(!spec.instance_dir.exists(), "instance dir left");
    let cg = anvil_backends::cgroup::CgroupManager::new(&CgroupConfig {
        root_name: CGROUP_ROOT.into(),
        base: None,
    })
    .unwrap()
    .open(&spec.cgroup_name)
    .unwrap();
    assert!(!cg.exists(), "cgroup left");
    assert!(
        mounts_under(w.state.path()).unwrap().is_empty(),
        "mount left"
    );
}

/// Run by `sandbox_survives_daemon_exit` in a separate process playing the daemon: creates a
/// sandbox, writes its runtime record and exits without destroying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of sandbox_survives_daemon_exit"]
async fn crash_helper() {
    let out = PathBuf::from(
        std::env::var_os("ANVIL_BWRAP_CRASH_OUT").expect("run by sandbox_survives_daemon_exit"),
    );
    let w = World::new("crash").expect("prerequisites checked by the parent");
    let mut spec = w.spec(1, Quota::default());
    spec.instance_dir = out.join("instance");
    let rt = w.backend.create(&spec).await.unwrap();
    std::fs::write(out.join("runtime.json"), serde_json::to_vec(&rt).unwrap()).unwrap();
    // Exit the process right away: no destroy, no drop of `w` (a crash, as far as the sandbox knows).
    std::process::exit(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_survives_daemon_exit() {
    let Some(w) = World::new("survive") else {
        return;
    };
    let out = w.state.path().join("crash");
    std::fs::create_dir_all(&out).unwrap();
    // Like init on a real host, this process adopts the orphaned bwrap so that it gets
    // reaped right away (this machine's pid 1 reaps lazily).
    // SAFETY: prctl with integer arguments.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "crash_helper", "--test-threads=1"])
        .env("ANVIL_BWRAP_CRASH_OUT", &out)
        .env("ANVIL_AGENT_BIN", prerequisites().unwrap().0)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "helper failed: {st}");
    let rt: Runtime =
        serde_json::from_slice(&std::fs::read(out.join("runtime.json")).unwrap()).unwrap();
    w.track(&rt);
    let pid = rt.pid.unwrap();
    assert!(running(pid), "sandbox died with its daemon");

    // A new backend instance (the restarted daemon) adopts it and can use it.
    let again = World::new("survive-2").unwrap();
    assert!(
        again.backend.adopt(&rt).await.unwrap(),
        "live sandbox not adopted"
    );
    assert_eq!(w.sh(&rt, "echo still here").await.0, "still here\n");

    let d = data(&rt);
    again.backend.destroy(&rt).await.unwrap();
    assert_host_clean(&rt, &d);
    assert!(
        mounts_under(w.state.path()).unwrap().is_empty(),
        "mount left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_timeout_kills_and_cleans_up() {
    // The agent runs but cannot report in time: bwrap is killed, everything removed.
    let Some(w) = World::with_cfg("slow", |c| c.ready_timeout = Duration::from_millis(1)) else {
        return;
    };
    // Under heavy load the agent can report before a 1 ms timer is first looked at: such a
    // create succeeds, proves nothing, and is destroyed; a later attempt must time out.
    let mut outcome = None;
    for n in 1..=5 {
        let spec = w.spec(n, Quota::default());
        match w.backend.create(&spec).await {
            Ok(rt) => w.backend.destroy(&rt).await.unwrap(),
            Err(e) => {
                outcome = Some((spec, e));
                break;
            }
        }
    }
    let (spec, err) = outcome.expect("five creates with a 1 ms ready timeout all succeeded");
    let msg = err.to_string();
    assert!(msg.contains("ready"), "{msg}");
    assert!(!spec.instance_dir.exists(), "instance dir left");
    assert!(
        mounts_under(w.state.path()).unwrap().is_empty(),
        "mount left"
    );
    let cg = anvil_backends::cgroup::CgroupManager::new(&CgroupConfig {
        root_name: CGROUP_ROOT.into(),
        base: None,
    })
    .unwrap()
    .open(&spec.cgroup_name)
    .unwrap();
    assert!(!cg.exists(), "cgroup left");
    assert!(cg.pids().unwrap().is_empty());
}
