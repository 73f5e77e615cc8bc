//! Async framing and connecting (Unix socket, or vsock through Firecracker's handshake).

use super::{AgentEndpoint, AgentError};
use anvil_protocol::{check_lengths, decode_header, encode_frame, PREFIX_LEN};
use bytes::{Buf, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Reads frames from a byte stream through an internal buffer, so [`FrameReader::next`] is
/// cancel-safe: a partially received frame stays buffered for the next call.
pub(crate) struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Next frame as (decoded header, body); `None` on a clean end of stream.
    pub(crate) async fn next<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Bytes)>, AgentError> {
        loop {
            if let Some((header, body)) = self.parse()? {
                let msg =
                    decode_header(&header).map_err(|e| AgentError::Protocol(e.to_string()))?;
                return Ok(Some((msg, body)));
            }
            let n = self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| AgentError::io("reading from agent", e))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(AgentError::Protocol(format!(
                    "agent closed the stream inside a frame ({} bytes pending)",
                    self.buf.len()
                )));
            }
        }
    }

    /// Like [`FrameReader::next`] but an end of stream is an error naming what was expected.
    pub(crate) async fn expect<T: DeserializeOwned>(
        &mut self,
        what: &str,
    ) -> Result<(T, Bytes), AgentError> {
        self.next().await?.ok_or_else(|| {
            AgentError::Protocol(format!("agent closed the connection before {what}"))
        })
    }

    fn parse(&mut self) -> Result<Option<(Bytes, Bytes)>, AgentError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&self.buf[..PREFIX_LEN]);
        let (h, b) = check_lengths(&prefix).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let total = PREFIX_LEN + h + b;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total).freeze();
        frame.advance(PREFIX_LEN);
        let header = frame.split_to(h);
        Ok(Some((header, frame)))
    }
}

pub(crate) async fn write_frame<W: AsyncWrite + Unpin, H: Serialize>(
    w: &mut W,
    header: &H,
    body: &[u8],
) -> Result<(), AgentError> {
    let buf = encode_frame(header, body).map_err(|e| AgentError::Protocol(e.to_string()))?;
    w.write_all(&buf)
        .await
        .map_err(|e| AgentError::io("writing to agent", e))
}

/// Connects to the Unix socket at `path` without following a symlink in its last
/// component. The socket's directory is shared with the sandbox (bwrap binds it at
/// /run/anvil), so the sandbox could replace the socket with a symlink to any host socket,
/// e.g. another sandbox's agent. The socket is opened with `O_PATH | O_NOFOLLOW`, checked
/// to be a socket, and connected through `/proc/self/fd`, leaving no window for a swap.
async fn connect_unix_nofollow(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket (symlink or other file)", path.display()),
        ));
    }
    let via = format!("/proc/self/fd/{}", file.as_raw_fd());
    let stream = UnixStream::connect(&via).await;
    drop(file);
    stream
}

/// Opens a stream to the agent; for vsock, performs Firecracker's `CONNECT <port>` handshake.
pub(crate) async fn connect(endpoint: &AgentEndpoint) -> Result<UnixStream, AgentError> {
    let conn_err = |source| AgentError::Connect {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        AgentEndpoint::Unix(path) => connect_unix_nofollow(path).await.map_err(conn_err),
        AgentEndpoint::Vsock { uds, port } => {
            let mut s = UnixStream::connect(uds).await.map_err(conn_err)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(conn_err)?;
            // Byte by byte: anything after the newline already belongs to the agent.
            let mut line = Vec::with_capacity(32);
            loop {
                let byte = s.read_u8().await.map_err(conn_err)?;
                if byte == b'\n' {
                    break;
                }
                if line.len() >= 128 {
                    return Err(AgentError::Protocol(
                        "vsock handshake reply too long".into(),
                    ));
                }
                line.push(byte);
            }
            if line.starts_with(b"OK ") {
                Ok(s)
            } else {
                Err(conn_err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!(
                        "vsock handshake for port {port} refused: {:?}",
                        String::from_utf8_lossy(&line)
                    ),
                )))
            }
        }
    }
}
