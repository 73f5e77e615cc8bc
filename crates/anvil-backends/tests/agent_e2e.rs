//! End-to-end tests of anvil-agent through the host client: the agent runs as a plain child
//! process (and, where possible, as pid 1 of a fresh pid namespace via `unshare`).
//!
//! The agent binary comes from ANVIL_AGENT_BIN, or is built with `cargo build -p anvil-agent`
//! into this test's target directory.

use anvil_backends::agent::{
    AgentClient, AgentEndpoint, AgentError, EntryKind, ErrorCode, ExecEvent, ExecRequest,
    ReadyInfo, ReadyListener,
};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ANVIL_AGENT_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "anvil-agent", "--target-dir"])
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building anvil-agent failed");
        profile_dir.join("anvil-agent")
    })
    .clone()
}

struct Agent {
    child: Child,
    sock: PathBuf,
    ready: ReadyInfo,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// `wrapper` runs before the agent (e.g. `unshare ...`).
    async fn start_with(wrapper: &[&str], extra: &[&str], envs: &[(&str, &str)]) -> Agent {
        // Not under /tmp: the `--init` test mounts a tmpfs there.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let sock = dir.path().join("agent.sock");
        let ready_path = dir.path().join("ready.sock");
        let listener = ReadyListener::bind(&ready_path).unwrap();
        let bin = agent_bin();
        let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        argv.push(bin.to_string_lossy().into_owned());
        argv.extend(["--listen".into(), format!("unix:{}", sock.display())]);
        argv.extend(["--notify".into(), format!("unix:{}", ready_path.display())]);
        argv.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(envs.iter().copied())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let ready = listener.wait(Duration::from_secs(20)).await.unwrap();
        eprintln!("agent ready after {:?}: {ready:?}", t0.elapsed());
        assert!(!ready_path.exists(), "ready socket removed after wait");
        Agent {
            child,
            sock,
            ready,
            _dir: dir,
        }
    }

    async fn start() -> Agent {
        Agent::start_with(&[], &[], &[]).await
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(AgentEndpoint::Unix(self.sock.clone()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("agent ignored SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    exec_req(&["sh", "-c", script])
}

/// (state, ppid, pgid) of a host process.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f[0].chars().next()?, f[1].parse().ok()?, f[2].parse().ok()?))
}

fn processes_in_group(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| proc_stat(p).is_some_and(|s| s.2 == pgid))
        .collect()
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            let ps = Command::new("ps")
                .args(["-eo", "pid,ppid,pgid,sid,stat,comm"])
                .output()
                .unwrap();
            panic!(
                "timed out waiting for {what}\n{}",
                String::from_utf8_lossy(&ps.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ready_and_health() {
    let a = Agent::start().await;
    assert_eq!(a.ready.pid, a.child.id() as i32);
    assert_eq!(a.ready.protocol, anvil_protocol::PROTOCOL_VERSION);
    let h = a.client().health().await.unwrap();
    assert_eq!(h.pid, a.ready.pid);
    assert_eq!(h.execs, 0);
    assert_eq!(h.zombies, 0);
    assert!(h.processes >= 1);
}

#[tokio::test]
async fn exec_basics() {
    let a = Agent::start().await;
    let c = a.client();
    let out = c
        .exec(exec_req(&["echo", "hi"]), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(&out.stdout[..], b"hi\n");
    assert_eq!(
        (out.exit.exit_code, out.exit.signal, out.exit.timed_out),
        (Some(0), None, false)
    );

    let out = c
        .exec(sh("exit 3"), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.exit.exit_code, Some(3));

    let out = c
        .exec(sh("kill -9 $$"), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!((out.exit.exit_code, out.exit.signal), (None, Some(9)));

    let out = c
        .exec(sh("echo oops >&2; echo out"), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(&out.stderr[..], b"oops\n");
    assert_eq!(&out.stdout[..], b"out\n");

    let mut req = sh("echo \"$FOO\"; pwd");
    req.env.insert("FOO".into(), "bar baz".into());
    req.cwd = Some("/usr".into());
    let out = c.exec(req, None).await.unwrap().collect().await.unwrap();
    assert_eq!(&out.stdout[..], b"bar baz\n/usr\n");
}

#[tokio::test]
async fn exec_start_errors() {
    let a = Agent::start().await;
    let c = a.client();
    for argv in [&["/nonexistent/prog"][..], &["no-such-command-anvil"][..]] {
        let err = c.exec(exec_req(argv), None).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotFound), "{argv:?}: {err}");
    }
    let err = c.exec(exec_req(&[]), None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    let mut req = exec_req(&["true"]);
    req.cwd = Some("relative".into());
    assert_eq!(
        c.exec(req, None).await.unwrap_err().code(),
        Some(ErrorCode::Invalid)
    );
}

#[tokio::test]
async fn exec_stdin_is_piped() {
    let a = Agent::start().await;
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let stream = a
        .client()
        .exec(exec_req(&["cat"]), Some(Bytes::from(data.clone())))
        .await
        .unwrap();
    let out = stream.collect().await.unwrap();
    assert_eq!(out.exit.exit_code, Some(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout[..] == data[..]);
    // Without stdin the command reads /dev/null.
    let out = a
        .client()
        .exec(exec_req(&["cat"]), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(out.stdout.is_empty());
    assert_eq!(out.exit.exit_code, Some(0));
}

#[tokio::test]
async fn exec_timeout_kills_the_group() {
    let a = Agent::start().await;
    let mut req = sh("sleep 10 & sleep 10");
    req.timeout_ms = Some(200);
    let t0 = Instant::now();
    let stream = a.client().exec(req, None).await.unwrap();
    let pid = stream.pid();
    let out = stream.collect().await.unwrap();
    assert!(out.exit.timed_out);
    assert_eq!(out.exit.signal, Some(9));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
    assert!(out.exit.duration_ms >= 200);
    // The leader was reaped, and its background sleep was killed (then reaped by the agent).
    wait_until("group gone", Duration::from_secs(3), || {
        processes_in_group(pid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn exec_streams_output_as_it_comes() {
    let a = Agent::start().await;
    let t0 = Instant::now();
    let mut s = a
        .client()
        .exec(sh("echo a; sleep 0.5; echo b"), None)
        .await
        .unwrap();
    let first = s.next().await.unwrap().unwrap();
    let first_at = t0.elapsed();
    assert_eq!(first, ExecEvent::Stdout(Bytes::from_static(b"a\n")));
    assert!(
        first_at < Duration::from_millis(400),
        "first output after {first_at:?}"
    );
    assert_eq!(
        s.next().await.unwrap().unwrap(),
        ExecEvent::Stdout(Bytes::from_static(b"b\n"))
    );
    assert!(t0.elapsed() >= Duration::from_millis(450));
    match s.next().await.unwrap().unwrap() {
        ExecEvent::Exit(e) => assert_eq!(e.exit_code, Some(0)),
        other => panic!("expected exit, got {other:?}"),
    }
    assert!(s.next().await.is_none());
}

#[tokio::test]
async fn dropping_the_stream_kills_the_process() {
    let a = Agent::start().await;
    let c = a.client();
    let s = c.exec(sh("sleep 30 & sleep 30"), None).await.unwrap();
    let pid = s.pid();
    wait_until("group running", Duration::from_secs(3), || {
        processes_in_group(pid).len() >= 2
    })
    .await;
    drop(s);
    wait_until("group gone", Duration::from_secs(3), || {
        processes_in_group(pid).is_empty()
    })
    .await;
    let h = c.health().await.unwrap();
    assert_eq!(h.execs, 0);
    // Also with stdin being fed.
    let s = c
        .exec(exec_req(&["sleep", "30"]), Some(Bytes::from_static(b"x")))
        .await
        .unwrap();
    let pid = s.pid();
    drop(s);
    wait_until("sleep gone", Duration::from_secs(3), || {
        processes_in_group(pid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn concurrent_execs() {
    let a = Agent::start().await;
    let c = a.client();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let c = c.clone();
        set.spawn(async move {
            let out = c
                .exec(sh(&format!("sleep 0.3; echo {i}")), None)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            assert_eq!(out.exit.exit_code, Some(0));
            (i, String::from_utf8(out.stdout.to_vec()).unwrap())
        });
    }
    let mut seen = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, out) = r.unwrap();
        assert_eq!(out, format!("{i}\n"));
        seen.push(i);
    }
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "not concurrent: {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn orphans_are_reaped_as_subreaper() {
    let a = Agent::start().await;
    let c = a.client();
    let out = c
        .exec(sh("sleep 0.1 & exit 0"), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.exit.exit_code, Some(0));
    let me = a.child.id() as i32;
    let zombie_children = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&p| proc_stat(p).is_some_and(|s| s.0 == 'Z' && s.1 == me))
            .count()
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(zombie_children(), 0);
    assert_eq!(c.health().await.unwrap().zombies, 0);
}

#[tokio::test]
async fn files_write_read_list() {
    let a = Agent::start().await;
    let c = a.client();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let path = format!("{d}/hello.txt");
    assert_eq!(
        c.write_file(&path, b"hello world\n", 0o640).await.unwrap(),
        12
    );
    assert_eq!(c.read_file(&path).await.unwrap(), b"hello world\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    // Overwrite atomically with another mode; an empty file works too.
    assert_eq!(c.write_file(&path, b"", 0o755).await.unwrap(), 0);
    assert_eq!(c.read_file(&path).await.unwrap(), b"");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("hello.txt", dir.path().join("link")).unwrap();
    let entries = c.list_dir(d).await.unwrap();
    let names: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        names,
        [
            ("hello.txt", EntryKind::File),
            ("link", EntryKind::Symlink),
            ("sub", EntryKind::Dir)
        ]
    );
    assert_eq!(entries[0].mode, 0o755);
    assert_eq!(entries[0].size, 0);
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[tokio::test]
async fn large_file_round_trip() {
    let a = Agent::start().await;
    let c = a.client();
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/big.bin", dir.path().display());
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 5).map(|i| (i % 253) as u8).collect();
    assert_eq!(
        c.write_file(&path, &data, 0o600).await.unwrap(),
        data.len() as u64
    );
    assert!(c.read_file(&path).await.unwrap() == data);
    let small = c.clone().with_max_file_bytes(1024);
    assert!(matches!(
        small.read_file(&path).await,
        Err(AgentError::TooLarge { .. })
    ));
}

fn code<T>(r: Result<T, AgentError>) -> Option<ErrorCode> {
    r.err().and_then(|e| e.code())
}

#[tokio::test]
async fn file_errors() {
    let a = Agent::start().await;
    let c = a.client();
    assert_eq!(
        code(c.read_file("etc/hostname").await),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        code(c.write_file("x.txt", b"x", 0o644).await),
        Some(ErrorCode::Invalid)
    );
    assert_eq!(code(c.list_dir("tmp").await), Some(ErrorCode::Invalid));
    assert_eq!(code(c.read_file("/a\0b").await), Some(ErrorCode::Invalid));
    assert_eq!(
        code(c.read_file("/nonexistent/file").await),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(c.list_dir("/nonexistent/dir").await),
        Some(ErrorCode::NotFound)
    );
    // Missing parent: not created, not_found (even for data spanning several frames).
    let big = vec![1u8; 5 * 1024 * 1024];
    assert_eq!(
        code(c.write_file("/nonexistent/dir/f", &big, 0o644).await),
        Some(ErrorCode::NotFound)
    );
    assert!(!Path::new("/nonexistent/dir").exists());
    assert_eq!(code(c.read_file("/").await), Some(ErrorCode::Invalid));
    // The agent still serves after all that.
    assert_eq!(c.health().await.unwrap().execs, 0);
}

/// A stand-in for Firecracker's vsock muxer: `CONNECT <port>\n` → `OK <n>\n`, then splice.
#[tokio::test]
async fn vsock_handshake() {
    let a = Agent::start().await;
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let l = tokio::net::UnixListener::bind(&uds).unwrap();
    let agent_sock = a.sock.clone();
    let mux = tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        loop {
            let (s, _) = l.accept().await.unwrap();
            let agent_sock = agent_sock.clone();
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                if line != "CONNECT 1024\n" {
                    s.get_mut().write_all(b"ERR no such port\n").await.unwrap();
                    return;
                }
                s.get_mut().write_all(b"OK 1073741824\n").await.unwrap();
                let mut up = tokio::net::UnixStream::connect(agent_sock).await.unwrap();
                let mut s = s.into_inner();
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    let c = AgentClient::new(AgentEndpoint::Vsock {
        uds: uds.clone(),
        port: 1024,
    });
    assert_eq!(c.health().await.unwrap().pid, a.ready.pid);
    let out = c
        .exec(exec_req(&["echo", "via vsock"]), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(&out.stdout[..], b"via vsock\n");
    let bad = AgentClient::new(AgentEndpoint::Vsock { uds, port: 9 });
    assert!(matches!(
        bad.health().await,
        Err(AgentError::Connect { .. })
    ));
    mux.abort();
}

#[tokio::test]
async fn ready_timeout_and_missing_agent() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.sock");
    let l = ReadyListener::bind(&p).unwrap();
    let err = l.wait(Duration::from_millis(100)).await.unwrap_err();
    assert!(
        matches!(err, AgentError::ReadyTimeout { waited, .. } if waited >= Duration::from_millis(100))
    );
    let msg = err.to_string();
    assert!(
        msg.contains("did not report ready within") && msg.contains("r.sock"),
        "{msg}"
    );
    assert!(!p.exists(), "socket removed");
    let c = AgentClient::new(AgentEndpoint::Unix(dir.path().join("none.sock")));
    assert!(matches!(c.health().await, Err(AgentError::Connect { .. })));
}

fn can_unshare() -> bool {
    let ok = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: `unshare --pid --fork --mount-proc` is not available (needs root)");
    }
    ok
}

/// The agent as pid 1 of a pid namespace: orphans re-parented to it are reaped, and
/// SIGTERM ends it cleanly.
#[tokio::test]
async fn pid1_reaps_zombies_and_handles_sigterm() {
    if !can_unshare() {
        return;
    }
    let mut a = Agent::start_with(
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        &[],
        &[],
    )
    .await;
    assert_eq!(a.ready.pid, 1);
    let c = a.client();
    let out = c
        .exec(sh("sleep 0.1 & exit 0"), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.exit.exit_code, Some(0));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let h = c.health().await.unwrap();
    assert_eq!((h.pid, h.zombies, h.processes), (1, 0, 1), "{h:?}");
    // SIGTERM to the agent (pid 1 inside): it exits 0, and unshare reports that.
    let unshare = a.child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
    let agent_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: plain kill of the agent we started.
    unsafe { libc::kill(agent_pid, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = a.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "agent did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(!a.sock.exists(), "listen socket removed on SIGTERM");
}

/// `--init` mounts a tmpfs on /tmp (not a mount point on this host) and sets the hostname.
#[tokio::test]
async fn init_mode_mounts_and_hostname() {
    if !can_unshare() {
        return;
    }
    let a = Agent::start_with(
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--mount",
            "--uts",
            "--kill-child",
        ],
        &["--init"],
        &[("ANVIL_HOSTNAME", "anvil-test-box")],
    )
    .await;
    let c = a.client();
    let out = c
        .exec(exec_req(&["hostname"]), None)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(&out.stdout[..], b"anvil-test-box\n");
    let out = c
        .exec(
            sh("grep -E ' /(tmp|run|proc|sys|dev) ' /proc/self/mountinfo"),
            None,
        )
        .await
        .unwrap();
    let text = String::from_utf8(out.collect().await.unwrap().stdout.to_vec()).unwrap();
    for m in [" /tmp ", " /proc ", " /sys ", " /dev "] {
        assert!(text.contains(m), "{m} not mounted:\n{text}");
    }
}
