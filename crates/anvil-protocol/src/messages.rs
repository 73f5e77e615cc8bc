//! Request and response headers.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the host sends. The first frame of a connection is the request; `data`/`eof` follow
/// for `exec` with stdin and for `write_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Health,
    Exec(ExecRequest),
    ReadFile {
        path: String,
    },
    WriteFile {
        path: String,
        mode: u32,
        size: u64,
    },
    ListDir {
        path: String,
    },
    /// Body = bytes (stdin, file content).
    Data,
    /// End of the `data` frames.
    Eof,
}

/// Run one command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's own environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the process group after this long; `exit.timed_out` is then true.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When true the host sends `data` frames for stdin and then `eof`; otherwise stdin is
    /// `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

/// What the agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    /// Sent once on the notify connection when the agent accepts requests.
    Ready(ReadyInfo),
    Health(HealthInfo),
    /// The exec'd process runs with this pid (in the sandbox's pid namespace).
    Started {
        pid: i32,
    },
    /// Body = bytes the process wrote to stdout.
    Stdout,
    /// Body = bytes the process wrote to stderr.
    Stderr,
    Exit(ExitInfo),
    /// Start of a file; `data` frames and `eof` follow.
    File {
        size: u64,
        mode: u32,
    },
    /// Body = bytes.
    Data,
    Eof,
    Written {
        bytes: u64,
    },
    Listing {
        entries: Vec<DirEntry>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// [`crate::PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// The agent's build version.
    pub version: String,
    pub pid: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthInfo {
    pub protocol: u32,
    pub version: String,
    pub pid: i32,
    pub uptime_ms: u64,
    /// Processes visible in the agent's `/proc` (its pid namespace, in a sandbox).
    pub processes: u32,
    /// Zombie children of the agent (not yet reaped). Stays 0 while reaping works.
    pub zombies: u32,
    /// Exec requests currently running.
    pub execs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit status when the process exited normally.
    pub exit_code: Option<i32>,
    /// Terminating signal when it was killed.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Error classes the daemon maps to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    Invalid,
    Io,
    TooLarge,
    /// A code this build does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Io => "io",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unknown => "unknown",
        }
    }

    /// Classifies an I/O error.
    pub fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        // Raw Linux errnos for kinds that are newer than the crate's MSRV.
        const ENOTDIR: i32 = 20;
        const EISDIR: i32 = 21;
        const EFBIG: i32 = 27;
        match (e.kind(), e.raw_os_error()) {
            (K::NotFound, _) => ErrorCode::NotFound,
            (K::PermissionDenied, _) => ErrorCode::PermissionDenied,
            (K::InvalidInput | K::InvalidData, _) => ErrorCode::Invalid,
            (_, Some(ENOTDIR | EISDIR)) => ErrorCode::Invalid,
            (_, Some(EFBIG)) => ErrorCode::TooLarge,
            _ => ErrorCode::Io,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a path sent by the host: absolute, no NUL bytes. Returns the reason otherwise.
pub fn validate_path(path: &str) -> Result<(), String> {
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    if !path.starts_with('/') {
        return Err(format!("path must be absolute: {path:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let j = serde_json::to_value(Request::Health).unwrap();
        assert_eq!(j, serde_json::json!({"op": "health"}));
        let j = serde_json::to_value(Request::ReadFile { path: "/a".into() }).unwrap();
        assert_eq!(j, serde_json::json!({"op": "read_file", "path": "/a"}));
        let r: Request =
            serde_json::from_value(serde_json::json!({"op": "exec", "argv": ["ls"]})).unwrap();
        assert_eq!(
            r,
            Request::Exec(ExecRequest {
                argv: vec!["ls".into()],
                ..Default::default()
            })
        );
        let j = serde_json::to_value(Response::Error {
            code: ErrorCode::NotFound,
            message: "m".into(),
        })
        .unwrap();
        assert_eq!(
            j,
            serde_json::json!({"op": "error", "code": "not_found", "message": "m"})
        );
        let e: Response = serde_json::from_value(
            serde_json::json!({"op": "error", "code": "brand_new", "message": ""}),
        )
        .unwrap();
        assert_eq!(
            e,
            Response::Error {
                code: ErrorCode::Unknown,
                message: String::new()
            }
        );
        let j = serde_json::to_value(Response::Exit(ExitInfo {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            duration_ms: 5,
        }))
        .unwrap();
        assert_eq!(
            j,
            serde_json::json!({"op": "exit", "exit_code": 3, "signal": null, "timed_out": false, "duration_ms": 5})
        );
    }

    #[test]
    fn io_error_codes() {
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(ErrorCode::from_io(&e), ErrorCode::NotFound);
        let e = std::io::Error::from_raw_os_error(13);
        assert_eq!(ErrorCode::from_io(&e), ErrorCode::PermissionDenied);
        let e = std::io::Error::from_raw_os_error(21);
        assert_eq!(ErrorCode::from_io(&e), ErrorCode::Invalid);
        let e = std::io::Error::from_raw_os_error(5);
        assert_eq!(ErrorCode::from_io(&e), ErrorCode::Io);
    }

    #[test]
    fn paths() {
        assert!(validate_path("/etc/hosts").is_ok());
        assert!(validate_path("etc/hosts").is_err());
        assert!(validate_path("").is_err());
        assert!(validate_path("/a\0b").is_err());
    }
}
