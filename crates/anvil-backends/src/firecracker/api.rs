//! Client of Firecracker's HTTP API on its per-VM Unix socket (swagger: `firecracker.yaml`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// Errors talking to one Firecracker API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to Firecracker API at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker API {method} {uri}: {detail}")]
    Transport {
        method: Method,
        uri: String,
        detail: String,
    },
    /// Firecracker refused the request; `fault` is its `fault_message`.
    #[error("Firecracker API {method} {uri} answered {status}: {fault}")]
    Fault {
        method: Method,
        uri: String,
        status: StatusCode,
        fault: String,
    },
    #[error("Firecracker API {method} {uri} timed out after {after:?}")]
    Timeout {
        method: Method,
        uri: String,
        after: Duration,
    },
}

/// `GET /` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// One VM's API socket. Cheap to clone; every request uses a fresh connection, so a client
/// survives Firecracker restarting its API thread and never shares a half-read stream.
#[derive(Debug, Clone)]
pub struct FcApi {
    socket: PathBuf,
    timeout: Duration,
}

impl FcApi {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        FcApi {
            socket: socket.into(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; returns the response body (empty for 204).
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, ApiError> {
        let fut = self.request_inner(method.clone(), uri, body);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                method,
                uri: uri.to_string(),
                after: self.timeout,
            }),
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, ApiError> {
        let transport = |detail: String| ApiError::Transport {
            method: method.clone(),
            uri: uri.to_string(),
            detail,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(format!("handshake: {e}")))?;
        let conn_task = tokio::spawn(async move {
            // The connection ends when the response is read and the sender dropped.
            let _ = conn.await;
        });
        let payload = match body {
            Some(v) => Bytes::from(
                serde_json::to_vec(v).map_err(|e| transport(format!("encode body: {e}")))?,
            ),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(payload))
            .map_err(|e| transport(format!("build request: {e}")))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| transport(format!("send: {e}")))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(format!("read body: {e}")))?
                .to_bytes();
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(ApiError::Fault {
                    method: method.clone(),
                    uri: uri.to_string(),
                    status,
                    fault: fault_message(&bytes),
                })
            }
        }
        .await;
        drop(sender);
        conn_task.abort();
        result
    }

    async fn put(&self, uri: &str, body: Value) -> Result<(), ApiError> {
        self.request(Method::PUT, uri, Some(&body))
            .await
            .map(|_| ())
    }

    pub async fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        let bytes = self.request(Method::GET, "/", None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Transport {
            method: Method::GET,
            uri: "/".into(),
            detail: format!("decode instance info: {e}"),
        })
    }

    pub async fn put_machine_config(&self, vcpus: u32, mem_mib: u64) -> Result<(), ApiError> {
        self.put(
            "/machine-config",
            json!({ "vcpu_count": vcpus, "mem_size_mib": mem_mib }),
        )
        .await
    }

    pub async fn put_boot_source(
        &self,
        kernel: &Path,
        initrd: Option<&Path>,
        boot_args: &str,
    ) -> Result<(), ApiError> {
        let mut body = json!({ "kernel_image_path": kernel, "boot_args": boot_args });
        if let Some(initrd) = initrd {
            body["initrd_path"] = json!(initrd);
        }
        self.put("/boot-source", body).await
    }

    pub async fn put_drive(
        &self,
        id: &str,
        path: &Path,
        root: bool,
        read_only: bool,
    ) -> Result<(), ApiError> {
        let body = json!({ "drive_id": id, "path_on_host": path, "is_root_device": root, "is_read_only": read_only });
        self.put(&format!("/drives/{id}"), body).await
    }

    pub async fn put_vsock(&self, guest_cid: u32, uds: &Path) -> Result<(), ApiError> {
        self.put("/vsock", json!({ "guest_cid": guest_cid, "uds_path": uds }))
            .await
    }

    pub async fn instance_start(&self) -> Result<(), ApiError> {
        self.put("/actions", json!({ "action_type": "InstanceStart" }))
            .await
    }

    pub async fn set_vm_state(&self, state: VmState) -> Result<(), ApiError> {
        self.request(Method::PATCH, "/vm", Some(&json!({ "state": state })))
            .await
            .map(|_| ())
    }

    /// Full snapshot of a paused VM.
    pub async fn snapshot_create(&self, vmstate: &Path, mem: &Path) -> Result<(), ApiError> {
        let body =
            json!({ "snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem });
        self.put("/snapshot/create", body).await
    }

    /// Loads a snapshot into a fresh Firecracker; memory is mapped MAP_PRIVATE from `mem`.
    pub async fn snapshot_load(
        &self,
        vmstate: &Path,
        mem: &Path,
        resume: bool,
    ) -> Result<(), ApiError> {
        let body = json!({
            "snapshot_path": vmstate,
            "mem_backend": { "backend_type": "File", "backend_path": mem },
            "resume_vm": resume,
        });
        self.put("/snapshot/load", body).await
    }
}

/// Firecracker answers errors as `{"fault_message": "..."}`; fall back to the raw body.
fn fault_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Fault {
        fault_message: String,
    }
    match serde_json::from_slice::<Fault>(body) {
        Ok(f) => f.fault_message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_message_is_extracted() {
        assert_eq!(
            fault_message(br#"{"fault_message":"bad kernel"}"#),
            "bad kernel"
        );
        assert_eq!(fault_message(b"plain text\n"), "plain text");
    }

    #[test]
    fn vm_state_serializes_as_firecracker_expects() {
        assert_eq!(
            json!({ "state": VmState::Paused }).to_string(),
            r#"{"state":"Paused"}"#
        );
    }
}
