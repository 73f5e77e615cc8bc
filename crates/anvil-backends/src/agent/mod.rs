//! Host-side client of the guest agent (`anvil-agent`), over the wire protocol of
//! [`anvil_protocol`].
//!
//! - [`AgentClient`] opens one connection per operation (health, exec, files).
//! - [`ReadyListener`] receives the agent's `ready` notification, so backends learn that a
//!   sandbox is up without polling.

mod client;
mod exec;
mod ready;
mod wire;

pub use anvil_protocol::{
    DirEntry, EntryKind, ErrorCode, ExecRequest, ExitInfo, HealthInfo, ReadyInfo,
};
pub use client::AgentClient;
pub use exec::{ExecEvent, ExecOutput, ExecStream};
pub use ready::ReadyListener;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket on the host (namespace backends bind-mount it into the sandbox).
    Unix(PathBuf),
    /// Firecracker-style vsock: a host Unix socket plus a `CONNECT <port>` handshake.
    Vsock { uds: PathBuf, port: u32 },
}

impl fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentEndpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            AgentEndpoint::Vsock { uds, port } => write!(f, "vsock:{}:{port}", uds.display()),
        }
    }
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
    /// An agent error whose code this build does not know.
    #[error("agent says: {0}")]
    Remote(String),
    /// An agent error with its class, for the daemon to map onto HTTP statuses.
    #[error("agent says ({code}): {message}")]
    RemoteCode { code: ErrorCode, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent {op} did not complete within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("agent did not report ready within {} ms (listening on {})", waited.as_millis(), path.display())]
    ReadyTimeout { path: PathBuf, waited: Duration },
    #[error("cannot bind ready socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("file of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
}

impl AgentError {
    /// The error class, when the agent (or a size limit) gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::RemoteCode { code, .. } => Some(*code),
            AgentError::TooLarge { .. } => Some(ErrorCode::TooLarge),
            _ => None,
        }
    }

    pub(crate) fn remote(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::Unknown => AgentError::Remote(message),
            code => AgentError::RemoteCode { code, message },
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}
