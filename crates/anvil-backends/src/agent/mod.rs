//! Host-side client of the guest agent (filled in by the agent work).

use std::path::PathBuf;

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket on the host (namespace backends bind-mount it into the sandbox).
    Unix(PathBuf),
    /// Firecracker-style vsock: a host Unix socket plus a `CONNECT <port>` handshake.
    Vsock { uds: PathBuf, port: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to agent at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent protocol error: {0}")]
    Protocol(String),
    #[error("agent says: {0}")]
    Remote(String),
}
