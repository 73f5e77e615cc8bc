//! Running the daemon: listeners, background loops, signals, graceful shutdown.

use crate::api::{self, Tokens};
use crate::manager::Manager;
use anvil_core::config::{Config, ShutdownMode};
use anvil_core::lifecycle::TerminationReason;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};

fn read_tokens(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("[listen].tokens_file {}: {e}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(format!(
            "[listen].tokens_file {} holds no token",
            path.display()
        ));
    }
    Ok(tokens)
}

/// Whether a daemon answers HTTP on `path`. A connect alone is not enough: after a
/// `kill -9`, a sandbox process forked by the dead daemon can still hold the listening
/// socket for a moment (between fork and exec): connects succeed, then the connection is
/// reset when that process execs, without an answer.
fn daemon_answers(path: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    let timeout = Some(std::time::Duration::from_secs(2));
    if s.set_read_timeout(timeout).is_err() || s.set_write_timeout(timeout).is_err() {
        return true;
    }
    let req = b"GET /v1/health HTTP/1.1\r\nHost: anvil\r\nConnection: close\r\n\r\n";
    if s.write_all(req).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(n) => n > 0,
        // Slow to answer is still alive: never steal the socket of a busy daemon.
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

fn bind_unix(path: &Path, group: Option<&str>) -> Result<UnixListener, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating socket directory {}: {e}", parent.display()))?;
    }
    if path.exists() {
        // A live daemon answers on it; refuse to steal its socket.
        if daemon_answers(path) {
            return Err(format!("another daemon is listening on {}", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("removing stale socket {}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    if let Some(g) = group {
        let grp = nix::unistd::Group::from_name(g)
            .map_err(|e| format!("[daemon].socket_group `{g}`: {e}"))?
            .ok_or_else(|| format!("[daemon].socket_group `{g}` does not exist"))?;
        nix::unistd::chown(path, None, Some(grp.gid))
            .map_err(|e| format!("chown {} to group {g}: {e}", path.display()))?;
    }
    Ok(l)
}

/// Runs the daemon until SIGTERM/SIGINT. Returns an error naming what failed at start.
pub async fn run(cfg: Config, config_path: std::path::PathBuf) -> Result<(), String> {
    // Handlers first: a SIGHUP or SIGTERM that arrives once the socket answers must be
    // handled, not kill the process with the default action.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let tokens = match (&cfg.listen.http_addr, &cfg.listen.tokens_file) {
        (Some(_), Some(f)) => read_tokens(f)?,
        (Some(addr), None) if !cfg.listen.allow_unauthenticated => {
            return Err(format!("[listen].http_addr = {addr} needs [listen].tokens_file, or allow_unauthenticated = true"));
        }
        _ => Vec::new(),
    };
    // Validation guarantees both or neither, and only with http_addr.
    let tls = match (&cfg.listen.tls_cert, &cfg.listen.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::acceptor(c, k)?),
        _ => None,
    };
    let socket = cfg.daemon.socket.clone();
    let unix = bind_unix(&socket, cfg.daemon.socket_group.as_deref())?;
    let tcp = match cfg.listen.http_socket_addr() {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("binding [listen].http_addr {addr}: {e}"))?,
        ),
        None => None,
    };
    let m = match Manager::start(cfg, config_path).await {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    m.preload_templates().await;
    tokio::spawn(m.clone().run_pools());
    tokio::spawn(m.clone().run_reaper());
    m.wake_pools.notify_one();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let unix_router = api::router(m.clone());
    let mut rx = stop_rx.clone();
    servers.push(tokio::spawn(async move {
        axum::serve(unix, unix_router)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
    }));
    info!(socket = %socket.display(), "listening on unix socket");
    if let Some(tcp) = tcp {
        let addr = tcp.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = api::tcp_router(m.clone(), Tokens(Arc::new(tokens)));
        let mut rx = stop_rx.clone();
        let stopped = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        match tls {
            Some(acceptor) => {
                let l = crate::tls::TlsListener::new(tcp, acceptor)
                    .map_err(|e| format!("TLS listener on {addr}: {e}"))?;
                servers.push(tokio::spawn(async move {
                    axum::serve(l, r).with_graceful_shutdown(stopped).await
                }));
                info!(%addr, "listening on tcp with TLS");
            }
            None => {
                servers.push(tokio::spawn(async move {
                    axum::serve(tcp, r).with_graceful_shutdown(stopped).await
                }));
                info!(%addr, "listening on tcp");
            }
        }
    }
    crate::sdnotify::notify("READY=1\nSTATUS=serving");

    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading policies");
                crate::sdnotify::notify("RELOADING=1");
                if let Err(e) = m.reload_policies().await {
                    error!(error = %e, "reload failed; previous policies kept");
                }
                crate::sdnotify::notify("READY=1");
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }
    crate::sdnotify::notify("STOPPING=1");
    m.shutting_down.store(true, Ordering::SeqCst);
    // Stop accepting; in-flight requests finish.
    let _ = stop_tx.send(true);
    for s in servers {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "server error during shutdown"),
            Err(e) => warn!(error = %e, "server task failed"),
        }
    }
    if m.cfg.daemon.shutdown == ShutdownMode::Destroy {
        info!("[daemon].shutdown = destroy: destroying every instance");
        m.destroy_all(TerminationReason::Shutdown).await;
    } else {
        info!("[daemon].shutdown = keep: sandboxes stay for the next daemon to adopt");
    }
    for b in m.registry.backends() {
        b.deactivate().await;
    }
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
    Ok(())
}
