//! One-shot operations: health, files, and starting an exec.

use super::exec::{ExecStream, Writer};
use super::wire::{connect, write_frame, FrameReader};
use super::{AgentEndpoint, AgentError};
use anvil_protocol::{DirEntry, ExecRequest, HealthInfo, Request, Response, CHUNK_SIZE};
use bytes::Bytes;
use std::future::Future;
use std::time::Duration;
use tokio::net::UnixStream;

/// Default bound for health, file and listing operations (not for running execs).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on a file read through [`AgentClient::read_file`].
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;

/// Talks to one agent; cheap to clone. Every call opens its own connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: AgentEndpoint,
    timeout: Duration,
    max_file_bytes: u64,
}

impl AgentClient {
    pub fn new(endpoint: AgentEndpoint) -> Self {
        AgentClient {
            endpoint,
            timeout: DEFAULT_TIMEOUT,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }

    /// Bounds health/file/listing calls and the connect + start of an exec.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest file [`AgentClient::read_file`] accepts.
    pub fn with_max_file_bytes(mut self, limit: u64) -> Self {
        self.max_file_bytes = limit;
        self
    }

    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, AgentError>>,
    ) -> Result<T, AgentError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| AgentError::Timeout {
                op,
                after: self.timeout,
            })?
    }

    async fn request(&self, req: &Request) -> Result<UnixStream, AgentError> {
        let mut s = connect(&self.endpoint).await?;
        write_frame(&mut s, req, &[]).await?;
        Ok(s)
    }

    pub async fn health(&self) -> Result<HealthInfo, AgentError> {
        self.bounded("health", async {
            let s = self.request(&Request::Health).await?;
            match FrameReader::new(s).expect::<Response>("health").await?.0 {
                Response::Health(info) => Ok(info),
                other => Err(unexpected(other, "health")),
            }
        })
        .await
    }

    /// Starts a command. Returns once the agent reports `started` (or the start error, e.g.
    /// `not_found` for a missing program). With `stdin`, the bytes are fed concurrently with
    /// reading output, then stdin is closed; without, stdin is `/dev/null`.
    pub async fn exec(
        &self,
        mut req: ExecRequest,
        stdin: Option<Bytes>,
    ) -> Result<ExecStream, AgentError> {
        req.stdin = stdin.is_some();
        let stream = self.bounded("exec", connect(&self.endpoint)).await?;
        let (rd, mut wr) = stream.into_split();
        write_frame(&mut wr, &Request::Exec(req), &[]).await?;
        let writer = match stdin {
            Some(data) => Writer::feed(wr, data),
            None => Writer::Idle(wr),
        };
        let mut reader = FrameReader::new(rd);
        // On error `writer` is dropped here, which closes the connection.
        let pid = self
            .bounded("exec", async {
                match reader.expect::<Response>("started").await?.0 {
                    Response::Started { pid } => Ok(pid),
                    other => Err(unexpected(other, "started")),
                }
            })
            .await?;
        Ok(ExecStream::new(pid, reader, writer))
    }

    /// Reads a whole file (up to the client's size limit).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, AgentError> {
        self.bounded("read_file", async {
            let s = self
                .request(&Request::ReadFile {
                    path: path.to_string(),
                })
                .await?;
            let mut r = FrameReader::new(s);
            let size = match r.expect::<Response>("file").await?.0 {
                Response::File { size, .. } => size,
                other => return Err(unexpected(other, "file")),
            };
            if size > self.max_file_bytes {
                return Err(AgentError::TooLarge {
                    size,
                    limit: self.max_file_bytes,
                });
            }
            let mut out = Vec::with_capacity(size as usize);
            loop {
                match r.expect::<Response>("eof").await? {
                    (Response::Data, body) => {
                        if (out.len() + body.len()) as u64 > self.max_file_bytes {
                            return Err(AgentError::TooLarge {
                                size: (out.len() + body.len()) as u64,
                                limit: self.max_file_bytes,
                            });
                        }
                        out.extend_from_slice(&body);
                    }
                    (Response::Eof, _) => return Ok(out),
                    (other, _) => return Err(unexpected(other, "data")),
                }
            }
        })
        .await
    }

    /// Writes a whole file atomically (temp file + rename) with permission bits `mode`.
    /// The parent directory must exist. Returns the bytes written.
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<u64, AgentError> {
        self.bounded("write_file", async {
            let req = Request::WriteFile {
                path: path.to_string(),
                mode,
                size: data.len() as u64,
            };
            let mut s = self.request(&req).await?;
            let mut sent = Ok(());
            for chunk in data.chunks(CHUNK_SIZE) {
                sent = write_frame(&mut s, &Request::Data, chunk).await;
                if sent.is_err() {
                    break;
                }
            }
            if sent.is_ok() {
                sent = write_frame(&mut s, &Request::Eof, &[]).await;
            }
            // On a write failure the agent may already have answered with the reason.
            match (FrameReader::new(s).next::<Response>().await, sent) {
                (Ok(Some((Response::Written { bytes }, _))), Ok(())) => Ok(bytes),
                (Ok(Some((other, _))), _) => Err(unexpected(other, "written")),
                (_, Err(e)) => Err(e),
                (Ok(None), Ok(())) => Err(AgentError::Protocol(
                    "agent closed the connection before written".into(),
                )),
                (Err(e), Ok(())) => Err(e),
            }
        })
        .await
    }

    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, AgentError> {
        self.bounded("list_dir", async {
            let s = self
                .request(&Request::ListDir {
                    path: path.to_string(),
                })
                .await?;
            match FrameReader::new(s).expect::<Response>("listing").await?.0 {
                Response::Listing { entries } => Ok(entries),
                other => Err(unexpected(other, "listing")),
            }
        })
        .await
    }
}

/// Turns an unexpected answer into an error; an `error` answer keeps its code.
pub(crate) fn unexpected(resp: Response, expected: &str) -> AgentError {
    match resp {
        Response::Error { code, message } => AgentError::remote(code, message),
        other => AgentError::Protocol(format!("expected `{expected}` from agent, got {other:?}")),
    }
}
