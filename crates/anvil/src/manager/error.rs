//! Errors of instance operations, each with an HTTP status and a machine code.

use anvil_backends::agent::ErrorCode;
use anvil_backends::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    NotFound {
        message: String,
        instance_id: Option<String>,
    },
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        instance_id: Option<String>,
    },
    #[error("{message}")]
    Unprocessable {
        code: &'static str,
        message: String,
        instance_id: Option<String>,
    },
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    TooLarge(String),
    #[error("{message}")]
    Backend {
        message: String,
        instance_id: Option<String>,
        source: BackendError,
    },
    #[error("{0}")]
    Internal(String),
}

impl OpError {
    pub fn not_found(what: impl Into<String>) -> Self {
        OpError::NotFound {
            message: what.into(),
            instance_id: None,
        }
    }

    pub fn instance_not_found(id: &str) -> Self {
        OpError::NotFound {
            message: format!("instance `{id}` not found"),
            instance_id: Some(id.to_string()),
        }
    }

    pub fn conflict(id: &str, message: impl Into<String>) -> Self {
        OpError::Conflict {
            code: "state_conflict",
            message: message.into(),
            instance_id: Some(id.to_string()),
        }
    }

    pub fn unsupported(id: &str, message: impl Into<String>) -> Self {
        OpError::Unprocessable {
            code: "not_supported",
            message: message.into(),
            instance_id: Some(id.to_string()),
        }
    }

    pub fn backend(id: &str, op: &str, e: BackendError) -> Self {
        match e {
            BackendError::Unsupported { .. } => OpError::unsupported(id, e.to_string()),
            other => OpError::Backend {
                message: format!("{op} of instance `{id}` failed: {other}"),
                instance_id: Some(id.to_string()),
                source: other,
            },
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        OpError::Internal(e.to_string())
    }

    /// A full filesystem under the state dir (a sandbox's upper layer, a checkpoint copy, the
    /// store) is the host's condition, not a bug: 507 Insufficient Storage.
    fn out_of_space(&self) -> bool {
        match self {
            OpError::Backend { .. } | OpError::Internal(_) => {
                let text = self.to_string();
                text.contains("No space left on device") || text.contains("os error 28")
            }
            _ => false,
        }
    }

    pub fn status(&self) -> u16 {
        if self.out_of_space() {
            return 507;
        }
        match self {
            OpError::BadRequest(_) => 400,
            OpError::NotFound { .. } => 404,
            OpError::Conflict { .. } => 409,
            OpError::TooLarge(_) => 413,
            OpError::Unprocessable { .. } => 422,
            OpError::Unavailable { .. } => 503,
            OpError::Backend { source, .. } => backend_status(source),
            OpError::Internal(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        if self.out_of_space() {
            return "insufficient_storage";
        }
        match self {
            OpError::BadRequest(_) => "bad_request",
            OpError::NotFound { .. } => "not_found",
            OpError::Conflict { code, .. } => code,
            OpError::TooLarge(_) => "too_large",
            OpError::Unprocessable { code, .. } => code,
            OpError::Unavailable { code, .. } => code,
            OpError::Backend { source, .. } => backend_code(source),
            OpError::Internal(_) => "internal",
        }
    }

    pub fn instance_id(&self) -> Option<&str> {
        match self {
            OpError::NotFound { instance_id, .. }
            | OpError::Conflict { instance_id, .. }
            | OpError::Unprocessable { instance_id, .. }
            | OpError::Backend { instance_id, .. } => instance_id.as_deref(),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            OpError::Unavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

fn backend_status(e: &BackendError) -> u16 {
    match e {
        BackendError::Unsupported { .. } => 422,
        BackendError::Gone(_) => 409,
        BackendError::Agent(a) => match a.code() {
            Some(ErrorCode::NotFound) => 404,
            Some(ErrorCode::Invalid) => 400,
            Some(ErrorCode::TooLarge) => 413,
            Some(ErrorCode::PermissionDenied) => 403,
            Some(_) => 422,
            None => 502,
        },
        BackendError::Spawn(_) => 503,
        _ => 500,
    }
}

fn backend_code(e: &BackendError) -> &'static str {
    match e {
        BackendError::Unsupported { .. } => "not_supported",
        BackendError::Gone(_) => "sandbox_gone",
        BackendError::Agent(a) => match a.code() {
            Some(ErrorCode::NotFound) => "file_not_found",
            Some(ErrorCode::Invalid) => "bad_request",
            Some(ErrorCode::TooLarge) => "too_large",
            Some(ErrorCode::PermissionDenied) => "permission_denied",
            Some(_) => "agent_error",
            None => "agent_unreachable",
        },
        BackendError::Spawn(_) => "spawn_failed",
        _ => "backend_error",
    }
}
