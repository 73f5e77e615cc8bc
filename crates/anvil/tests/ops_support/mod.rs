//! Helpers for the ops_* tests: a daemon started with a chosen environment (NOTIFY_SOCKET,
//! log settings) on a temporary socket with the mock backend, and a tiny HTTP/1.1 client over
//! the Unix socket (std only, so tests can run it while they block on other sockets).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const MOCK_POLICY: &str = r#"
manifest_version = 1
policy_name = "mock-default"
priority = 10
[match]
workload_class = ["mock-class"]
[select]
backend_priority = ["mock"]
[pool]
enabled = false
reset_mode = "overlayfs-rollback"
"#;

pub struct OpsDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl OpsDaemon {
    /// Writes a config (mock backend, one policy, `daemon_extra` appended to `[daemon]`) into a
    /// fresh temp dir. Nothing runs yet.
    pub fn new(daemon_extra: &str) -> OpsDaemon {
        let dir = tempfile::Builder::new()
            .prefix("anvil-ops-")
            .tempdir()
            .unwrap();
        let pdir = dir.path().join("policies");
        std::fs::create_dir_all(&pdir).unwrap();
        std::fs::write(pdir.join("mock.toml"), MOCK_POLICY).unwrap();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let cfg = format!(
            "[daemon]\nstate_dir = \"state\"\nsocket = \"api.sock\"\nshutdown = \"destroy\"\n{daemon_extra}\n\n[backends]\nmock = \"builtin\"\n\n[policy]\ndir = \"policies\"\n\n[cgroup]\nroot = \"{name}\"\n"
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, cfg).unwrap();
        OpsDaemon {
            socket: dir.path().join("api.sock"),
            config,
            dir,
            child: None,
        }
    }

    /// A temp dir with `config.toml` = `config` (which may use paths relative to the dir) and
    /// `policies/<name>` for each given policy. Nothing runs yet.
    pub fn with_config(config: &str, policies: &[(&str, &str)]) -> OpsDaemon {
        let dir = tempfile::Builder::new()
            .prefix("anvil-ops-")
            .tempdir()
            .unwrap();
        let pdir = dir.path().join("policies");
        std::fs::create_dir_all(&pdir).unwrap();
        for (name, text) in policies {
            std::fs::write(pdir.join(name), text).unwrap();
        }
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        OpsDaemon {
            socket: dir.path().join("api.sock"),
            config: path,
            dir,
            child: None,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns `anvil daemon start` with exactly the given extra environment (ANVIL_LOG and
    /// NOTIFY_SOCKET from the test's own environment are removed first); stderr and stdout go
    /// to the log file. Does not wait for anything.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        self.spawn_wrapped(&[], env)
    }

    /// Like `spawn`, with the daemon started through `wrapper` (e.g. `setpriv ... --`): the
    /// wrapper must exec the daemon so its pid is the daemon's. The log is appended to.
    pub fn spawn_wrapped(&mut self, wrapper: &[String], env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(env!("CARGO_BIN_EXE_anvil"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_anvil")),
        };
        cmd.args(["daemon", "start", "--config"])
            .arg(&self.config)
            .env_remove("ANVIL_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("ANVIL_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon not spawned").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill({sig})");
    }

    /// Waits until the API answers /v1/health with 200, or panics with the log.
    pub fn wait_serving(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = self.try_request("GET", "/v1/health", None) {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited with {st} during start:\n{}", self.log());
            }
            assert!(
                t0.elapsed() < timeout,
                "daemon did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the daemon to exit (killing it after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("daemon not spawned");
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > timeout {
                let _ = c.kill();
                let st = c.wait().unwrap();
                panic!(
                    "daemon did not exit within {timeout:?} ({st}):\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        http(&self.socket, method, path, body)
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }
}

impl OpsDaemon {
    /// SIGTERM and wait (kill after 20 s) if a daemon runs; never panics.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for /v1/health to answer 200; never panics.
    pub fn try_wait_serving(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok((200, _)) = self.try_request("GET", "/v1/health", None) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for OpsDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body (chunked bodies
/// are decoded).
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: anvil\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or("bad chunk header")?;
        let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).ok_or("short chunk")?);
        s = rest.get(n + 2..).ok_or("short chunk trailer")?;
    }
}
