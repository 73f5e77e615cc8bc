//! systemd integration (SPEC §1 operators, §9): the real daemon binary talks sd_notify to a
//! NOTIFY_SOCKET this test owns — READY=1 once it serves, RELOADING=1 then READY=1 around a
//! SIGHUP reload (also when the reload fails), STOPPING=1 on SIGTERM — and every message comes
//! from the daemon's main pid (what systemd's NotifyAccess=main accepts). Under a running
//! systemd (pid 1) the daemon is also started with `systemd-run` as a Type=notify unit.
mod ops_support;

use nix::sys::socket::{recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags};
use ops_support::OpsDaemon;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// The test's end of the notify protocol: a datagram socket with SO_PASSCRED, so every
/// message arrives with the sender's pid.
struct NotifySocket {
    sock: UnixDatagram,
}

impl NotifySocket {
    fn new(sock: UnixDatagram) -> NotifySocket {
        setsockopt(&sock, PassCred, &true).unwrap();
        NotifySocket { sock }
    }

    /// The next message and its sender's pid, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<(String, i32)> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let msg = match recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg: {e}"),
        };
        let pid = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(cr) => Some(cr.pid()),
                _ => None,
            })
            .expect("no SCM_CREDENTIALS on a notify message");
        let n = msg.bytes;
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), pid))
    }

    /// Waits for the next message, asserts it is from `pid` and holds every line in `want`.
    fn expect(&self, d: &OpsDaemon, want: &[&str], timeout: Duration) -> String {
        let (msg, from) = self.recv(timeout).unwrap_or_else(|| {
            panic!(
                "no sd_notify message {want:?} within {timeout:?}\n{}",
                d.log()
            )
        });
        assert_eq!(
            from,
            d.pid(),
            "message {msg:?} not from the daemon's main pid"
        );
        let lines: Vec<&str> = msg.lines().collect();
        for w in want {
            assert!(
                lines.contains(w),
                "expected {w:?} in sd_notify message {msg:?}"
            );
        }
        msg
    }
}

#[test]
fn ready_reloading_stopping_on_a_path_socket() {
    let mut d = OpsDaemon::new("log_level = \"debug\"");
    let path = d.dir.path().join("notify.sock");
    let n = NotifySocket::new(UnixDatagram::bind(&path).unwrap());
    let t0 = Instant::now();
    d.spawn(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);

    // READY=1 arrives on its own (no polling of the API first), and by then the API serves.
    let ready = n.expect(&d, &["READY=1"], Duration::from_secs(20));
    assert!(
        ready.contains("STATUS="),
        "READY carries a STATUS line: {ready:?}"
    );
    let (st, body) = d.request("GET", "/v1/health", None);
    assert_eq!(st, 200, "API not serving when READY=1 arrived: {body}");
    eprintln!("READY=1 after {:?}", t0.elapsed());
    let (st, body) = d.request(
        "POST",
        "/v1/instances",
        Some(r#"{"workload_class":"mock-class"}"#),
    );
    assert_eq!(st, 201, "{body}");

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC for systemd >= 253), then READY=1.
    d.signal(libc::SIGHUP);
    let reloading = n.expect(&d, &["RELOADING=1"], Duration::from_secs(10));
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|v| v > 0), "{reloading:?}");
    n.expect(&d, &["READY=1"], Duration::from_secs(10));

    // A failing reload still ends with READY=1 (the old policies stay in force).
    std::fs::write(d.dir.path().join("policies/broken.toml"), "policy_name = [").unwrap();
    d.signal(libc::SIGHUP);
    n.expect(&d, &["RELOADING=1"], Duration::from_secs(10));
    n.expect(&d, &["READY=1"], Duration::from_secs(10));
    let (st, body) = d.request("GET", "/v1/policies", None);
    assert_eq!(st, 200);
    assert!(body.contains("mock-default"), "old policies kept: {body}");
    assert!(
        d.log().contains("broken.toml"),
        "the log names the bad file:\n{}",
        d.log()
    );

    // SIGTERM: STOPPING=1, then a clean exit and nothing more on the socket.
    d.signal(libc::SIGTERM);
    n.expect(&d, &["STOPPING=1"], Duration::from_secs(10));
    let st = d.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "daemon exit status {st}\n{}", d.log());
    assert!(
        n.recv(Duration::from_millis(200)).is_none(),
        "unexpected sd_notify message after STOPPING=1"
    );
    assert!(!d.socket.exists(), "the API socket is removed on stop");
}

#[test]
fn ready_and_stopping_on_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let mut d = OpsDaemon::new("");
    let name = format!(
        "anvil-ops-notify-{}-{}",
        std::process::id(),
        d.dir.path().file_name().unwrap().to_string_lossy()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let n = NotifySocket::new(UnixDatagram::bind_addr(&addr).unwrap());
    d.spawn(&[("NOTIFY_SOCKET", &format!("@{name}"))]);
    n.expect(&d, &["READY=1"], Duration::from_secs(20));
    assert_eq!(d.request("GET", "/v1/health", None).0, 200);
    d.signal(libc::SIGTERM);
    n.expect(&d, &["STOPPING=1"], Duration::from_secs(10));
    assert!(
        d.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        d.log()
    );
}

#[test]
fn unreachable_notify_socket_does_not_stop_the_daemon() {
    let mut d = OpsDaemon::new("");
    let missing = d.dir.path().join("no-such-dir/notify.sock");
    d.spawn(&[("NOTIFY_SOCKET", missing.to_str().unwrap())]);
    d.wait_serving(Duration::from_secs(20));
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.request("GET", "/v1/health", None).0, 200);
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        d.log()
    );
}

/// Under a real systemd: `systemd-run` a transient Type=notify service (as the packaged unit
/// does) and check systemd sees it active only once it serves, reloads it, and stops it.
#[test]
fn under_systemd_run_when_systemd_is_pid1() {
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        eprintln!(
            "SKIP: systemd is not the init system here (no /run/systemd/system; pid 1 is `{}`), \
             so systemd-run cannot start units; the NOTIFY_SOCKET tests above cover the protocol",
            std::fs::read_to_string("/proc/1/comm")
                .unwrap_or_default()
                .trim()
        );
        return;
    }
    let d = OpsDaemon::new("");
    let unit = format!("anvil-ops-test-{}.service", std::process::id());
    let systemctl = |args: &[&str]| {
        std::process::Command::new("systemctl")
            .args(args)
            .output()
            .unwrap()
    };
    // systemd-run returns once the start job finished: for Type=notify, after READY=1.
    let out = std::process::Command::new("systemd-run")
        .arg(format!("--unit={unit}"))
        .args([
            "--collect",
            "--property=Type=notify",
            "--property=KillMode=process",
        ])
        .arg("--property=ExecReload=/bin/kill -HUP $MAINPID")
        .arg(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "start", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stop = || systemctl(&["stop", &unit]);
    let active = systemctl(&["is-active", &unit]);
    let state = String::from_utf8_lossy(&active.stdout).trim().to_string();
    if state != "active" {
        stop();
        panic!("unit {unit} is {state} after systemd-run returned");
    }
    let health = d.try_request("GET", "/v1/health", None);
    let reload = systemctl(&["reload", &unit]);
    let after = String::from_utf8_lossy(&systemctl(&["is-active", &unit]).stdout)
        .trim()
        .to_string();
    let stopped = stop();
    assert!(
        matches!(health, Ok((200, _))),
        "health when active: {health:?}"
    );
    assert!(
        reload.status.success(),
        "systemctl reload: {}",
        String::from_utf8_lossy(&reload.stderr)
    );
    assert_eq!(after, "active", "unit after reload");
    assert!(
        stopped.status.success(),
        "systemctl stop: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(!d.socket.exists(), "the API socket is removed on stop");
}
