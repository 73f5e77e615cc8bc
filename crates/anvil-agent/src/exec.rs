//! `exec`: run a command in its own process group and stream its output.
//!
//! Threads per exec: this connection thread waits for the exit (with the timeout); a pump
//! thread streams stdout/stderr as they arrive; a host thread feeds stdin and notices the
//! host going away (then the group is killed).

use crate::server::{Ctx, Session};
use anvil_protocol::{validate_path, ErrorCode, ExecRequest, ExitInfo, Request, Response};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After the main process exits, how long background processes that inherited its
/// stdout/stderr may keep the exec open while we drain what they write.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
const READ_CHUNK: usize = 64 * 1024;

fn kill_group(pgid: i32) {
    // SAFETY: plain kill; the group was created by setsid in the child.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

pub fn run(s: &Arc<Session>, ctx: &Arc<Ctx>, req: ExecRequest) {
    let Some(program) = req.argv.first() else {
        s.send_error(ErrorCode::Invalid, "argv is empty");
        return;
    };
    if let Some(cwd) = &req.cwd {
        if let Err(msg) = validate_path(cwd) {
            s.send_error(ErrorCode::Invalid, format!("cwd: {msg}"));
            return;
        }
    }
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .envs(&req.env)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: setsid and signal are async-signal-safe. Its own session/process group lets a
    // timeout or a cancel kill everything the command started; default dispositions undo
    // whatever was ignored by whoever started the agent.
    unsafe {
        cmd.pre_exec(|| {
            for sig in 1..32 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            if libc::setsid() < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let started = Instant::now();
    let (mut child, status_rx) = match ctx.reaper.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let code = ErrorCode::from_io(&e);
            s.send_error(code, format!("cannot start {program:?}: {e}"));
            return;
        }
    };
    let pid = child.id() as i32;
    ctx.execs.fetch_add(1, Ordering::Relaxed);
    let _count = ExecCount(ctx.clone());
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    drop(child); // never waited through std: the reaper owns exit statuses

    let exited = Arc::new(AtomicBool::new(false));
    if s.send(&Response::Started { pid }, &[]).is_err() {
        kill_group(pid);
    }
    let host = {
        let (s, exited) = (s.clone(), exited.clone());
        std::thread::Builder::new()
            .name("exec-host".into())
            .spawn(move || host_side(&s, stdin, pid, &exited))
    };
    if host.is_err() {
        // Without it we could not notice the host leaving; do not run unsupervised.
        kill_group(pid);
    }
    let (wake_r, wake_w) = match pipe() {
        Ok(p) => (Some(p.0), Some(p.1)),
        Err(e) => {
            crate::log(&format!("exec pipe: {e}"));
            (None, None)
        }
    };
    let pump = {
        let s = s.clone();
        std::thread::Builder::new()
            .name("exec-out".into())
            .spawn(move || {
                let fds = [stdout.map(OwnedFd::from), stderr.map(OwnedFd::from)];
                pump(&s, fds, wake_r, pid)
            })
    };
    if pump.is_err() {
        kill_group(pid);
    }

    let mut timed_out = false;
    let status = match req.timeout_ms {
        Some(ms) => match status_rx.recv_timeout(Duration::from_millis(ms)) {
            Ok(st) => Ok(st),
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                kill_group(pid);
                status_rx.recv().map_err(|_| ())
            }
            Err(RecvTimeoutError::Disconnected) => Err(()),
        },
        None => status_rx.recv().map_err(|_| ()),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    exited.store(true, Ordering::SeqCst);

    // Tell the pump the leader is gone, then wait for the output to be drained.
    drop(wake_w);
    if let Ok(p) = pump {
        let _ = p.join();
    }
    match status {
        Ok(st) => {
            let (exit_code, signal) = if libc::WIFEXITED(st) {
                (Some(libc::WEXITSTATUS(st)), None)
            } else if libc::WIFSIGNALED(st) {
                (None, Some(libc::WTERMSIG(st)))
            } else {
                (None, None)
            };
            let exit = ExitInfo {
                exit_code,
                signal,
                timed_out,
                duration_ms,
            };
            let _ = s.send(&Response::Exit(exit), &[]);
        }
        Err(()) => {
            kill_group(pid);
            s.send_error(ErrorCode::Io, "lost the exit status (reaper stopped)");
        }
    }
    // Unblocks the host thread; the host has all it needs.
    s.shutdown();
    if let Ok(h) = host {
        let _ = h.join();
    }
}

struct ExecCount(Arc<Ctx>);

impl Drop for ExecCount {
    fn drop(&mut self) {
        self.0.execs.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Feeds `data` frames to stdin until `eof`, then keeps reading so that a closed
/// connection (the host gave up) kills the group.
fn host_side(s: &Session, mut stdin: Option<ChildStdin>, pgid: i32, exited: &AtomicBool) {
    loop {
        match s.recv() {
            Ok(Some((Request::Data, body))) => {
                if let Some(w) = stdin.as_mut() {
                    // EPIPE: the command stopped reading; drop the rest of its input.
                    if w.write_all(&body).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some((Request::Eof, _))) => stdin = None,
            Ok(Some(_)) => {
                // A protocol violation: treat like a lost host.
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if !exited.load(Ordering::SeqCst) {
        kill_group(pgid);
    }
}

/// Streams stdout/stderr frames as bytes arrive. When `wake` becomes readable (its writer
/// closed: the leader exited), keeps draining for at most [`DRAIN_GRACE`].
fn pump(s: &Session, mut fds: [Option<OwnedFd>; 2], wake: Option<OwnedFd>, pgid: i32) {
    let mut wake = wake;
    let mut deadline: Option<Instant> = None;
    let mut host_ok = true;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if fds.iter().all(Option::is_none) {
            return;
        }
        let timeout_ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                left.as_millis().max(1) as i32
            }
            None => -1,
        };
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut slots = Vec::with_capacity(3);
        for (i, fd) in fds.iter().enumerate() {
            if let Some(fd) = fd {
                pfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                slots.push(i);
            }
        }
        if let Some(w) = &wake {
            pfds.push(libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            slots.push(2);
        }
        // SAFETY: pfds is a valid array of pfds.len() entries.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            crate::log(&format!("exec poll: {e}"));
            return;
        }
        for (pfd, &slot) in pfds.iter().zip(&slots) {
            if pfd.revents == 0 {
                continue;
            }
            if slot == 2 {
                wake = None;
                deadline = Some(Instant::now() + DRAIN_GRACE);
                continue;
            }
            let Some(fd) = &fds[slot] else { continue };
            let n = match read_fd(fd, &mut buf) {
                Ok(0) | Err(_) => {
                    fds[slot] = None;
                    continue;
                }
                Ok(n) => n,
            };
            if host_ok {
                let resp = if slot == 0 {
                    Response::Stdout
                } else {
                    Response::Stderr
                };
                if s.send(&resp, &buf[..n]).is_err() {
                    // The host is gone: nobody wants this output, and the command must go.
                    host_ok = false;
                    kill_group(pgid);
                }
            }
        }
    }
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
