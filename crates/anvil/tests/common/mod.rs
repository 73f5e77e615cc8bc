//! Test harness: runs the real `anvil` binary on a temporary socket (and optionally TCP) and
//! talks HTTP to it.
#![allow(dead_code)]

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Firecracker binary scripts/install-firecracker.sh installs.
pub const FIRECRACKER: &str = "/usr/local/bin/firecracker";

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Why tests with real Firecracker VMs cannot run here, if they cannot.
pub fn fc_skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("firecracker tests need root".into());
    }
    if !Path::new(FIRECRACKER).exists() {
        return Some(format!(
            "{FIRECRACKER} missing (scripts/install-firecracker.sh)"
        ));
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm not usable".into());
    }
    None
}

/// The test guest kernel (built by guest/test-guest/build.sh into `dir/guest`) and a 1 MiB
/// disk image in `dir`.
pub fn test_guest_assets(dir: &Path) -> (PathBuf, PathBuf) {
    let out = Command::new(repo().join("guest/test-guest/build.sh"))
        .arg(dir.join("guest"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernel = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    (kernel, image)
}

pub const MOCK_POLICY: &str = r#"
manifest_version = 1
policy_name = "mock-default"
priority = 10
[match]
workload_class = ["mock-class", "mock-pooled"]
[select]
backend_priority = ["mock"]
[pool]
enabled = false
reset_mode = "overlayfs-rollback"
"#;

/// A pooled mock policy for class `mock-pooled` (higher priority than MOCK_POLICY).
pub const MOCK_POOL_POLICY: &str = r#"
manifest_version = 1
policy_name = "mock-pooled"
priority = 20
[match]
workload_class = ["mock-pooled"]
[select]
backend_priority = ["mock"]
[pool]
enabled = true
min = 1
target = 3
max = 5
warm_ttl = "10m"
reset_mode = "overlayfs-rollback"
"#;

pub struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Opts {
    /// `[backends]` lines, e.g. `mock = "builtin"`.
    pub backends: String,
    /// (file name, TOML) of policy files.
    pub policies: Vec<(String, String)>,
    /// Extra config text appended verbatim (other sections).
    pub extra: String,
    /// Extra `[daemon]` keys.
    pub daemon_extra: String,
    pub tcp: bool,
    pub token: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            backends: "mock = \"builtin\"".into(),
            policies: vec![("mock.toml".into(), MOCK_POLICY.into())],
            extra: String::new(),
            daemon_extra: String::new(),
            tcp: false,
            token: None,
        }
    }
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub tcp_addr: Option<String>,
    pub token: Option<String>,
    child: Option<Child>,
    pub rt: tokio::runtime::Runtime,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The static agent built by scripts/build-agent.sh (or $ANVIL_AGENT_BIN).
pub fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ANVIL_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("x86_64-unknown-linux-gnu/release/anvil-agent");
    p.is_file().then_some(p)
}

impl Daemon {
    pub fn start(opts: Opts) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("anvil-test-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("api.sock");
        let pdir = dir.path().join("policies");
        std::fs::create_dir_all(&pdir).unwrap();
        for (name, text) in &opts.policies {
            std::fs::write(pdir.join(name), text).unwrap();
        }
        let tcp_addr = opts.tcp.then(|| format!("127.0.0.1:{}", free_port()));
        let mut listen = String::new();
        if let Some(a) = &tcp_addr {
            listen.push_str(&format!("[listen]\nhttp_addr = \"{a}\"\n"));
            match &opts.token {
                Some(t) => {
                    std::fs::write(dir.path().join("tokens"), format!("{t}\n")).unwrap();
                    listen.push_str("tokens_file = \"tokens\"\n");
                }
                None => listen.push_str("allow_unauthenticated = true\n"),
            }
        }
        let agent = agent_binary()
            .map(|p| format!("agent_binary = \"{}\"\n", p.display()))
            .unwrap_or_default();
        let cgroup_root = format!(
            "anvil-test-{}",
            dir.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace("anvil-test-", "")
        );
        let cfg = format!(
            "[daemon]\nlog_level = \"debug\"\nstate_dir = \"state\"\nsocket = \"api.sock\"\nshutdown = \"destroy\"\n{agent}{}\n{listen}\n[backends]\n{}\n\n[policy]\ndir = \"policies\"\n\n[cgroup]\nroot = \"{cgroup_root}\"\n\n{}\n",
            opts.daemon_extra, opts.backends, opts.extra
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, cfg).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut d = Daemon {
            dir,
            socket,
            config,
            tcp_addr,
            token: opts.token,
            child: None,
            rt,
        };
        d.spawn();
        d
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the daemon (again) and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_anvil"))
            .args(["daemon", "start", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.try_request("GET", "/v1/health", None, &[]) {
                if r.status == 200 {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("daemon exited with {st} during start:\n{}", self.log());
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9` the daemon (sandboxes stay behind for the next daemon to adopt).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn sigterm(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        if let Some(p) = self.pid() {
            unsafe { libc::kill(p as i32, sig) };
        }
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Response, String> {
        let socket = self.socket.clone();
        let req = build(method, path, body, headers);
        self.rt.block_on(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| e.to_string())?;
            send(TokioIo::new(stream), req).await
        })
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Response {
        self.try_request(method, path, body, &[])
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()))
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: serde_json::Value) -> Response {
        self.request("POST", path, Some(serde_json::to_vec(&body).unwrap()))
    }

    pub fn put(&self, path: &str, body: Vec<u8>) -> Response {
        self.request("PUT", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Response {
        self.request("DELETE", path, None)
    }

    /// A request over TCP, with `Authorization: Bearer <token>` when given.
    pub fn tcp(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> Response {
        let addr = self.tcp_addr.clone().expect("daemon has no TCP listener");
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let req = build(method, path, body, &headers);
        self.rt
            .block_on(async move {
                let stream = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| e.to_string())?;
                send(TokioIo::new(stream), req).await
            })
            .unwrap_or_else(|e| panic!("tcp {method} {path}: {e}"))
    }

    /// Creates an instance and returns its id (asserting 201).
    pub fn create(&self, body: serde_json::Value) -> String {
        let r = self.post("/v1/instances", body);
        assert_eq!(r.status, 201, "create: {}", r.text());
        r.json()["instance"]["id"].as_str().unwrap().to_string()
    }

    /// Waits until `f` holds, polling (tests only), or panics with `what`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sigterm();
        // A daemon keeps its cgroup root (sandboxes may outlive it); a test daemon's root is
        // removed once empty, so test runs leave no cgroup directories behind.
        if let Some(root) = cgroup_root_of(&self.config) {
            remove_empty_cgroup_root(&root);
        }
    }
}

/// `[cgroup].root` of a config file (default `anvil`, which is never removed here).
fn cgroup_root_of(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let root = table.get("cgroup")?.get("root")?.as_str()?.to_string();
    (root != "anvil" && !root.contains('/') && !root.is_empty()).then_some(root)
}

/// rmdir (only succeeds when empty) of `root` in every mounted hierarchy.
pub fn remove_empty_cgroup_root(root: &str) {
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(root));
    for e in rd.flatten() {
        let _ = std::fs::remove_dir(e.path().join(root));
    }
}

fn build(
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Request<Full<bytes::Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "anvil");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
        .unwrap()
}

async fn send<T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static>(
    io: T,
    req: Request<Full<bytes::Bytes>>,
) -> Result<Response, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok(Response {
        status,
        headers,
        body,
    })
}

// ---- helpers added for the api_* tests ----

/// Asserts an error answer: the status, the JSON body `{error, code, status}` with a
/// non-empty message, and (when given) the machine code. Returns the body.
pub fn expect_error(r: &Response, status: u16, code: Option<&str>) -> serde_json::Value {
    assert_eq!(
        r.status,
        status,
        "expected {status}, got {}: {}",
        r.status,
        r.text()
    );
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "error content-type `{ct}`: {}",
        r.text()
    );
    let v = r.json();
    assert_eq!(v["status"], status, "status field: {v}");
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "error message: {v}"
    );
    assert!(
        v["code"].as_str().is_some_and(|s| !s.is_empty()),
        "code: {v}"
    );
    if let Some(c) = code {
        assert_eq!(v["code"], c, "code: {v}");
    }
    v
}

impl Daemon {
    /// GET an instance's JSON (asserting 200).
    pub fn instance(&self, id: &str) -> serde_json::Value {
        let r = self.get(&format!("/v1/instances/{id}"));
        assert_eq!(r.status, 200, "GET instance {id}: {}", r.text());
        r.json()
    }

    /// The state of an instance.
    pub fn state_of(&self, id: &str) -> String {
        self.instance(id)["state"].as_str().unwrap().to_string()
    }

    /// Ids of the instances `GET /v1/instances?<query>` lists.
    pub fn ids(&self, query: &str) -> Vec<String> {
        let r = self.get(&format!("/v1/instances?{query}"));
        assert_eq!(r.status, 200, "list ?{query}: {}", r.text());
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Stats of the pool (backend, class), if it exists.
    pub fn pool_stats(&self, backend: &str, class: &str) -> Option<serde_json::Value> {
        let r = self.get(&format!("/v1/pools/{backend}/{class}"));
        assert_eq!(r.status, 200, "pool {backend}/{class}: {}", r.text());
        r.json()
            .as_array()
            .unwrap()
            .first()
            .map(|p| p["stats"].clone())
    }

    /// Warm count of the pool (0 when it does not exist).
    pub fn warm_count(&self, backend: &str, class: &str) -> u64 {
        self.pool_stats(backend, class)
            .map(|s| s["warm_count"].as_u64().unwrap())
            .unwrap_or(0)
    }

    /// A JSON request with any method.
    pub fn json_req(&self, method: &str, path: &str, body: serde_json::Value) -> Response {
        self.request(method, path, Some(serde_json::to_vec(&body).unwrap()))
    }
}

// ---- helpers added for the bwrap_* tests ----

/// One line of a streamed (NDJSON) response body and when its newline arrived, measured
/// from just before the request was sent.
#[derive(Debug, Clone)]
pub struct TimedLine {
    pub at: Duration,
    pub line: String,
}

impl Daemon {
    /// Sends a request and reads the body frame by frame as it arrives (no buffering of the
    /// whole body): returns the status and every line with its arrival time.
    pub fn stream_lines(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Vec<TimedLine>) {
        let socket = self.socket.clone();
        let req = build(method, path, body, &[]);
        let out = self.rt.block_on(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let t0 = Instant::now();
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let (mut buf, mut lines) = (Vec::<u8>::new(), Vec::new());
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let at = t0.elapsed();
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    lines.push(TimedLine {
                        at,
                        line: String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                    });
                }
            }
            if !buf.is_empty() {
                lines.push(TimedLine {
                    at: t0.elapsed(),
                    line: String::from_utf8_lossy(&buf).into_owned(),
                });
            }
            Ok::<_, String>((status, lines))
        });
        out.unwrap_or_else(|e| panic!("streaming {method} {path}: {e}\n{}", self.log()))
    }
}

impl Daemon {
    /// Starts the daemon on a config written by the caller into `dir` (its socket must be
    /// `socket`); for tests of config files other than the harness's own.
    pub fn start_with_config(dir: tempfile::TempDir, config_text: &str, socket: PathBuf) -> Daemon {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_text).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut d = Daemon {
            dir,
            socket,
            config,
            tcp_addr: None,
            token: None,
            child: None,
            rt,
        };
        d.spawn();
        d
    }
}
