//! Building the bwrap command line and starting it inside the sandbox cgroup.

use super::layout::{self, BwrapData};
use super::process::Pidfd;
use super::BwrapConfig;
use crate::agent::ReadyListener;
use crate::cgroup::join_cgroup_raw;
use crate::steps::Steps;
use crate::{BackendError, InstanceSpec};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// bwrap arguments for one sandbox (everything after the program name).
pub fn bwrap_args(
    cfg: &BwrapConfig,
    data: &BwrapData,
    spec: &InstanceSpec,
) -> Result<Vec<OsString>, BackendError> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
        for i in items {
            a.push(i.as_ref().to_owned());
        }
    };
    // user, ipc, pid, net, uts, cgroup namespaces; network only when the policy grants it.
    push(&[&"--unshare-all"]);
    // --unshare-all only *tries* a user namespace; insist on one, and forbid nested ones:
    // a sandbox must not reach the kernel's user-namespace-only code paths.
    push(&[&"--unshare-user", &"--disable-userns"]);
    if spec.network {
        push(&[&"--share-net"]);
    }
    push(&[&"--as-pid-1", &"--new-session", &"--cap-drop", &"ALL"]);
    push(&[&"--bind", &data.rootfs, &"/"]);
    push(&[&"--proc", &"/proc", &"--dev", &"/dev", &"--tmpfs", &"/tmp"]);
    push(&[&"--bind", &data.run_dir, &layout::GUEST_RUN]);
    push(&[&"--ro-bind", &cfg.agent, &layout::GUEST_AGENT]);
    let hostname = layout::short_hostname(&spec.id);
    push(&[&"--hostname", &hostname]);
    push(&[
        &"--clearenv",
        &"--setenv",
        &"PATH",
        &layout::GUEST_PATH,
        &"--setenv",
        &"HOME",
        &"/root",
    ]);
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(BackendError::Other(format!(
                "invalid environment variable name `{k}`"
            )));
        }
        push(&[&"--setenv", k, v]);
    }
    push(&[&"--chdir", &"/"]);
    push(&[
        &layout::GUEST_AGENT,
        &"--listen",
        &layout::GUEST_AGENT_SOCK,
        &"--notify",
        &layout::GUEST_READY_SOCK,
    ]);
    Ok(a)
}

/// Spawns bwrap (own session, inside the cgroup before it execs) and waits until the agent
/// reports ready, bwrap exits, or the timeout passes. Returns (pid, start time). On error
/// the bwrap process is killed and reaped; the caller tears down the rest.
pub async fn spawn_and_wait(
    cfg: &BwrapConfig,
    data: &BwrapData,
    spec: &InstanceSpec,
    steps: &mut Steps,
) -> Result<(i32, Option<u64>), BackendError> {
    let args = bwrap_args(cfg, data, spec)?;
    // Stale sockets from a previous run of this instance (reset) would confuse clients.
    let _ = std::fs::remove_file(&data.agent_socket);
    let ready = ReadyListener::bind(&data.ready_socket())?;
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.console_log())
        .map_err(|e| BackendError::io(format!("open {}", data.console_log().display()), e))?;
    let console_err = console
        .try_clone()
        .map_err(|e| BackendError::io("dup console log", e))?;
    let procs = data
        .cgroup
        .procs_fds()
        .map_err(|e| BackendError::Other(format!("cgroup: {e}")))?;
    let raw = procs.raw();

    let mut cmd = Command::new(&cfg.bwrap);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err);
    // SAFETY: only async-signal-safe calls (setsid, write) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: no signal aimed at the daemon's group or terminal reaches it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            join_cgroup_raw(&raw)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| BackendError::Spawn(format!("spawn {}: {e}", cfg.bwrap.display())))?;
    drop(procs);
    let pid = child.id() as i32;
    // The std handle is not needed: exit is watched and reaped through the pidfd.
    drop(child);
    let start_time = crate::procfs::pid_start_time(pid);
    let pidfd = match Pidfd::open(pid, None) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(BackendError::Spawn("bwrap exited immediately".into())),
        Err(e) => {
            // Cannot watch it: do not leave it running.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(BackendError::io("pidfd_open bwrap", e));
        }
    };

    steps.mark("spawn");
    let outcome = tokio::select! {
        r = ready.wait(cfg.ready_timeout) => r.map_err(BackendError::from),
        _ = pidfd.exited() => Err(BackendError::Spawn("bwrap exited before the agent was ready".into())),
    };
    match outcome {
        Ok(info) => {
            steps.mark("agent_ready");
            tracing::debug!(pid, ?info, "agent ready");
            Ok((pid, start_time))
        }
        Err(e) => {
            pidfd.kill();
            if pidfd.exited_within(Duration::from_secs(5)).await {
                pidfd.reap();
            }
            Err(e)
        }
    }
}
