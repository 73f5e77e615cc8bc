//! Listening, readiness notification, dispatch, health, termination.

use crate::args::{Addr, Args};
use crate::net::{self, Conn};
use crate::reaper::Reaper;
use crate::{exec, files, init, log};
use anvil_protocol::{
    read_message, write_frame, ErrorCode, FrameError, HealthInfo, ReadyInfo, Request, Response,
    PROTOCOL_VERSION,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// State shared by all connections.
pub struct Ctx {
    pub reaper: Reaper,
    pub started: Instant,
    pub execs: AtomicU32,
}

/// One host connection: a reader (one thread at a time) and serialized frame writes.
pub struct Session {
    conn: Conn,
    write_lock: Mutex<()>,
}

impl Session {
    pub fn send(&self, resp: &Response, body: &[u8]) -> Result<(), FrameError> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut &self.conn, resp, body)
    }

    pub fn recv(&self) -> Result<Option<(Request, Vec<u8>)>, FrameError> {
        read_message(&mut &self.conn)
    }

    /// Sends an `error` answer; a failure to send only means the host is gone.
    pub fn send_error(&self, code: ErrorCode, message: impl Into<String>) {
        let _ = self.send(
            &Response::Error {
                code,
                message: message.into(),
            },
            &[],
        );
    }

    pub fn shutdown(&self) {
        self.conn.shutdown();
    }
}

pub fn serve(args: Args) -> Result<(), String> {
    let ctx = Arc::new(Ctx {
        reaper: Reaper::default(),
        started: Instant::now(),
        execs: AtomicU32::new(0),
    });
    let reaper_ctx = ctx.clone();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper_ctx.reaper.run())
        .map_err(|e| format!("cannot start reaper thread: {e}"))?;

    let listener =
        net::listen(&args.listen).map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let listen_addr = args.listen.clone();
    let init_mode = args.init;
    let sig_ctx = ctx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || terminate_on_signal(&sig_ctx, &listen_addr, init_mode))
        .map_err(|e| format!("cannot start signal thread: {e}"))?;

    if let Some(notify) = &args.notify {
        notify_ready(notify);
    }
    log(&format!("listening on {}", args.listen));

    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // ECONNABORTED and friends concern one connection; keep serving.
                log(&format!("accept: {e}"));
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    // Resource exhaustion: back off instead of spinning on the same error.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                continue;
            }
        };
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let session = Arc::new(Session {
                    conn,
                    write_lock: Mutex::new(()),
                });
                handle(&session, &ctx);
            });
        if let Err(e) = spawned {
            log(&format!("cannot start connection thread: {e}"));
        }
    }
}

/// Connects to the daemon's ready socket and says `ready`; logged, not fatal, on failure
/// (the daemon can still probe `health`).
fn notify_ready(addr: &Addr) {
    let ready = Response::Ready(ReadyInfo {
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id() as i32,
    });
    match net::connect(addr) {
        Ok(conn) => {
            if let Err(e) = write_frame(&mut &conn, &ready, &[]) {
                log(&format!("sending ready to {addr}: {e}"));
            }
        }
        Err(e) => log(&format!("cannot connect to notify address {addr}: {e}")),
    }
}

fn handle(s: &Arc<Session>, ctx: &Arc<Ctx>) {
    let (req, _body) = match s.recv() {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            s.send_error(ErrorCode::Invalid, format!("bad request frame: {e}"));
            return;
        }
    };
    match req {
        Request::Health => {
            let _ = s.send(&Response::Health(health(ctx)), &[]);
        }
        Request::Exec(req) => exec::run(s, ctx, req),
        Request::ReadFile { path } => files::read(s, &path),
        Request::WriteFile { path, mode, size } => files::write(s, &path, mode, size),
        Request::ListDir { path } => files::list(s, &path),
        Request::Data | Request::Eof => {
            s.send_error(ErrorCode::Invalid, "data/eof frame without a request")
        }
    }
}

fn health(ctx: &Ctx) -> HealthInfo {
    let me = std::process::id() as i32;
    let (mut processes, mut zombies) = (0u32, 0u32);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            processes += 1;
            if let Some((state, ppid)) = proc_state(pid) {
                if state == 'Z' && ppid == me {
                    zombies += 1;
                }
            }
        }
    }
    HealthInfo {
        protocol: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: me,
        uptime_ms: ctx.started.elapsed().as_millis() as u64,
        processes,
        zombies,
        execs: ctx.execs.load(Ordering::Relaxed),
    }
}

/// (state, ppid) from /proc/<pid>/stat; the command name may contain spaces and ')'.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// On SIGTERM/SIGINT: kill running commands, remove our socket, leave. As pid 1, kill
/// everything else first. As the init of a VM (pid 1 of the initial pid namespace), reboot
/// instead of exiting, since init exiting panics the kernel; Firecracker exits on reboot.
fn terminate_on_signal(ctx: &Ctx, listen: &Addr, init_mode: bool) {
    let sig = init::wait_termination_signal();
    log(&format!("signal {sig}: shutting down"));
    for pgid in ctx.reaper.running() {
        // SAFETY: plain kill of a process group we created.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    if let Addr::Unix(path) = listen {
        let _ = std::fs::remove_file(path);
    }
    if std::process::id() == 1 {
        // SAFETY: as pid 1, -1 means every other process of our pid namespace / VM.
        unsafe {
            libc::kill(-1, libc::SIGKILL);
            libc::sync();
        }
        if init_mode && init::in_initial_pid_namespace() {
            // SAFETY: plain syscall; on failure we fall through to exit.
            unsafe { libc::reboot(libc::RB_AUTOBOOT) };
            log(&format!("reboot: {}", std::io::Error::last_os_error()));
        }
    }
    std::process::exit(0);
}
