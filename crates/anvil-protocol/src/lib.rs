//! Wire protocol between the anvil daemon (host) and its guest agent.
//!
//! Transport: any reliable byte stream (a Unix socket, or Firecracker vsock after the
//! `CONNECT <port>` handshake). One request per connection, so concurrency needs no
//! multiplexing: the host opens a connection per operation.
//!
//! Every message is a [frame](frame): a JSON header plus a raw body. Requests are
//! [`Request`]s tagged `{"op": ...}`, answers are [`Response`]s tagged the same way.
//!
//! Conversations:
//! - `health` → `health`
//! - `exec` (+ `data`… `eof` when `stdin` is true) → `started`, then `stdout`/`stderr`…, `exit`
//!   (or a single `error` when the process cannot start). Closing the connection before
//!   `exit` kills the process group.
//! - `read_file` → `file`, `data`…, `eof`
//! - `write_file` + `data`… + `eof` → `written`
//! - `list_dir` → `listing`
//!
//! Any request may instead be answered by `error`.

pub mod frame;
pub mod messages;

pub use frame::{
    check_lengths, decode_header, encode_frame, read_frame, read_message, write_frame, FrameError,
    RawFrame, MAX_BODY, MAX_HEADER, PREFIX_LEN,
};
pub use messages::*;

/// Bumped on incompatible changes of the messages below.
pub const PROTOCOL_VERSION: u32 = 1;

/// Preferred size of `data`/`stdout`/`stderr` bodies (well under [`MAX_BODY`]).
pub const CHUNK_SIZE: usize = 1 << 20;
