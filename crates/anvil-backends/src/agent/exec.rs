//! A running exec: streamed output events, then the exit.

use super::client::unexpected;
use super::wire::{write_frame, FrameReader};
use super::AgentError;
use anvil_protocol::{ExitInfo, Request, Response, CHUNK_SIZE};
use bytes::{Bytes, BytesMut};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitInfo),
}

/// Everything an exec produced, for callers that do not stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Bytes,
    pub stderr: Bytes,
    pub exit: ExitInfo,
}

/// The write half of the exec connection. It must stay open until the exec ends: the agent
/// kills the process group when the host side of the connection closes.
pub(crate) enum Writer {
    /// Held only to keep the connection open.
    Idle(#[allow(dead_code)] OwnedWriteHalf),
    /// Feeding stdin; the task hands the write half back when done.
    Feeding(JoinHandle<Option<OwnedWriteHalf>>),
}

impl Writer {
    pub(crate) fn feed(mut wr: OwnedWriteHalf, data: Bytes) -> Self {
        Writer::Feeding(tokio::spawn(async move {
            for chunk in data.chunks(CHUNK_SIZE) {
                if let Err(e) = write_frame(&mut wr, &Request::Data, chunk).await {
                    // The process may exit without reading all of its input.
                    tracing::debug!(error = %e, "exec stdin not fully delivered");
                    return Some(wr);
                }
            }
            if let Err(e) = write_frame(&mut wr, &Request::Eof, &[]).await {
                tracing::debug!(error = %e, "exec stdin eof not delivered");
            }
            Some(wr)
        }))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Writer::Feeding(task) = self {
            task.abort();
        }
    }
}

/// Output of a started exec. Dropping it closes the connection, and the agent then kills
/// the process group. [`ExecStream::next`] is cancel-safe.
pub struct ExecStream {
    pid: i32,
    reader: FrameReader<OwnedReadHalf>,
    _writer: Writer,
    finished: bool,
}

impl ExecStream {
    pub(crate) fn new(pid: i32, reader: FrameReader<OwnedReadHalf>, writer: Writer) -> Self {
        ExecStream {
            pid,
            reader,
            _writer: writer,
            finished: false,
        }
    }

    /// Pid of the process in the sandbox's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Next output or the exit; `None` after the exit (or after an error).
    pub async fn next(&mut self) -> Option<Result<ExecEvent, AgentError>> {
        if self.finished {
            return None;
        }
        let item = match self.reader.next::<Response>().await {
            Ok(Some((Response::Stdout, body))) => Ok(ExecEvent::Stdout(body)),
            Ok(Some((Response::Stderr, body))) => Ok(ExecEvent::Stderr(body)),
            Ok(Some((Response::Exit(info), _))) => Ok(ExecEvent::Exit(info)),
            Ok(Some((other, _))) => Err(unexpected(other, "stdout, stderr or exit")),
            Ok(None) => Err(AgentError::Protocol(
                "agent closed the exec stream before the exit".into(),
            )),
            Err(e) => Err(e),
        };
        if !matches!(item, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_))) {
            self.finished = true;
        }
        Some(item)
    }

    /// Waits for the exit, gathering all output.
    pub async fn collect(mut self) -> Result<ExecOutput, AgentError> {
        let (mut stdout, mut stderr) = (BytesMut::new(), BytesMut::new());
        while let Some(ev) = self.next().await {
            match ev? {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exit(exit) => {
                    return Ok(ExecOutput {
                        stdout: stdout.freeze(),
                        stderr: stderr.freeze(),
                        exit,
                    })
                }
            }
        }
        Err(AgentError::Protocol(
            "exec stream ended without an exit".into(),
        ))
    }
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("pid", &self.pid)
            .field("finished", &self.finished)
            .finish()
    }
}
