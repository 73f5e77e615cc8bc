//! Readiness without polling: the agent connects to a socket we bind and sends `ready`.

use super::wire::FrameReader;
use super::AgentError;
use anvil_protocol::{ReadyInfo, Response};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::UnixListener;

/// A bound Unix socket waiting for one agent's `ready` frame. For Firecracker, bind it on
/// `<vsock_uds>_<port>` (where Firecracker forwards guest-initiated vsock connections).
/// The socket file is removed when the listener is dropped.
#[derive(Debug)]
pub struct ReadyListener {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Binds `path` (replacing a stale socket file). Works outside a tokio runtime.
    pub fn bind(path: &Path) -> Result<ReadyListener, AgentError> {
        let bind_err = |source| AgentError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
        // Build the guard first so the file is removed on the error paths below.
        let this = ReadyListener {
            listener,
            path: path.to_path_buf(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        this.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for an agent to connect and send `ready`. Connections that send
    /// anything else are logged and dropped; the wait goes on until the deadline.
    pub async fn wait(self, timeout: Duration) -> Result<ReadyInfo, AgentError> {
        let started = Instant::now();
        let std_listener = self
            .listener
            .try_clone()
            .map_err(|e| AgentError::io(format!("ready socket {}", self.path.display()), e))?;
        let listener = UnixListener::from_std(std_listener)
            .map_err(|e| AgentError::io(format!("ready socket {}", self.path.display()), e))?;
        let res = tokio::time::timeout(timeout, async {
            loop {
                let (stream, _) = listener
                    .accept()
                    .await
                    .map_err(|e| AgentError::io(format!("accept on {}", self.path.display()), e))?;
                match FrameReader::new(stream).next::<Response>().await {
                    Ok(Some((Response::Ready(info), _))) => return Ok(info),
                    Ok(Some((other, _))) => tracing::warn!(path = %self.path.display(), ?other, "unexpected frame on ready socket"),
                    Ok(None) => tracing::warn!(path = %self.path.display(), "ready connection closed without a frame"),
                    Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "bad ready connection"),
                }
            }
        })
        .await;
        match res {
            Ok(r) => r,
            Err(_) => Err(AgentError::ReadyTimeout {
                path: self.path.clone(),
                waited: started.elapsed(),
            }),
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
