//! Framing: `[u32 BE header len][u32 BE body len][header JSON][body bytes]`.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};

/// Largest accepted JSON header (1 MiB).
pub const MAX_HEADER: usize = 1 << 20;
/// Largest accepted body per frame (4 MiB); bigger payloads span several `data` frames.
pub const MAX_BODY: usize = 4 << 20;
/// Length of the two length fields that start every frame.
pub const PREFIX_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame header of {0} bytes exceeds the limit of {MAX_HEADER} bytes")]
    HeaderTooLarge(usize),
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY} bytes")]
    BodyTooLarge(usize),
    #[error("frame header is empty")]
    EmptyHeader,
    #[error("stream ended inside a frame ({got} of {expected} bytes of the {part})")]
    Truncated {
        part: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("invalid frame header JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("i/o error on agent stream: {0}")]
    Io(#[from] io::Error),
}

/// An undecoded frame: header JSON bytes and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub header: Vec<u8>,
    pub body: Vec<u8>,
}

impl RawFrame {
    /// Parses the header as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        decode_header(&self.header)
    }
}

/// Parses a header JSON as `T`.
pub fn decode_header<T: DeserializeOwned>(header: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(header)?)
}

/// Validates the length prefix of a frame and returns (header len, body len).
pub fn check_lengths(prefix: &[u8; PREFIX_LEN]) -> Result<(usize, usize), FrameError> {
    let h = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let b = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    if h == 0 {
        return Err(FrameError::EmptyHeader);
    }
    if h > MAX_HEADER {
        return Err(FrameError::HeaderTooLarge(h));
    }
    if b > MAX_BODY {
        return Err(FrameError::BodyTooLarge(b));
    }
    Ok((h, b))
}

/// Serializes one frame into a buffer (header and body checked against the limits).
pub fn encode_frame<H: Serialize>(header: &H, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(header)?;
    if json.len() > MAX_HEADER {
        return Err(FrameError::HeaderTooLarge(json.len()));
    }
    if body.len() > MAX_BODY {
        return Err(FrameError::BodyTooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + json.len() + body.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    Ok(out)
}

/// Writes one frame with a single `write_all` (so concurrent writers serialized by a mutex
/// never interleave partial frames) and flushes.
pub fn write_frame<W: Write, H: Serialize>(
    w: &mut W,
    header: &H,
    body: &[u8],
) -> Result<(), FrameError> {
    let buf = encode_frame(header, body)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<RawFrame>, FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let got = read_full(r, &mut prefix)?;
    if got == 0 {
        return Ok(None);
    }
    if got < PREFIX_LEN {
        return Err(FrameError::Truncated {
            part: "length prefix",
            expected: PREFIX_LEN,
            got,
        });
    }
    let (h, b) = check_lengths(&prefix)?;
    let mut header = vec![0u8; h];
    let got = read_full(r, &mut header)?;
    if got < h {
        return Err(FrameError::Truncated {
            part: "header",
            expected: h,
            got,
        });
    }
    let mut body = vec![0u8; b];
    let got = read_full(r, &mut body)?;
    if got < b {
        return Err(FrameError::Truncated {
            part: "body",
            expected: b,
            got,
        });
    }
    Ok(Some(RawFrame { header, body }))
}

/// Reads one frame and decodes its header as `T`.
pub fn read_message<R: Read, T: DeserializeOwned>(
    r: &mut R,
) -> Result<Option<(T, Vec<u8>)>, FrameError> {
    match read_frame(r)? {
        None => Ok(None),
        Some(f) => Ok(Some((f.decode()?, f.body))),
    }
}

/// Like `read_exact`, but reports how many bytes arrived before EOF instead of failing.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, ExecRequest, Request, Response};
    use std::io::Cursor;

    #[test]
    fn round_trip_several_frames() {
        let mut buf = Vec::new();
        let req = Request::Exec(ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            env: [("A".to_string(), "b".to_string())].into_iter().collect(),
            cwd: Some("/tmp".into()),
            timeout_ms: Some(100),
            stdin: true,
        });
        write_frame(&mut buf, &req, b"").unwrap();
        write_frame(&mut buf, &Request::Data, b"payload\0bytes").unwrap();
        write_frame(&mut buf, &Request::Eof, b"").unwrap();
        let mut r = Cursor::new(buf);
        let (got, body): (Request, _) = read_message(&mut r).unwrap().unwrap();
        assert_eq!(got, req);
        assert!(body.is_empty());
        let (got, body): (Request, _) = read_message(&mut r).unwrap().unwrap();
        assert_eq!(got, Request::Data);
        assert_eq!(body, b"payload\0bytes");
        let (got, _): (Request, _) = read_message(&mut r).unwrap().unwrap();
        assert_eq!(got, Request::Eof);
        assert!(
            read_frame(&mut r).unwrap().is_none(),
            "clean EOF between frames"
        );
    }

    #[test]
    fn max_body_is_accepted() {
        let body = vec![7u8; MAX_BODY];
        let mut buf = Vec::new();
        write_frame(&mut buf, &Response::Data, &body).unwrap();
        let f = read_frame(&mut Cursor::new(buf)).unwrap().unwrap();
        assert_eq!(f.body.len(), MAX_BODY);
    }

    #[test]
    fn oversize_body_rejected_on_write_and_read() {
        let body = vec![0u8; MAX_BODY + 1];
        let mut buf = Vec::new();
        assert!(
            matches!(write_frame(&mut buf, &Response::Data, &body), Err(FrameError::BodyTooLarge(n)) if n == MAX_BODY + 1)
        );
        assert!(buf.is_empty(), "nothing written on rejection");
        let mut raw = Vec::new();
        raw.extend_from_slice(&2u32.to_be_bytes());
        raw.extend_from_slice(&((MAX_BODY + 1) as u32).to_be_bytes());
        raw.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame(&mut Cursor::new(raw)),
            Err(FrameError::BodyTooLarge(_))
        ));
    }

    #[test]
    fn oversize_header_rejected() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&((MAX_HEADER + 1) as u32).to_be_bytes());
        raw.extend_from_slice(&0u32.to_be_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(raw)),
            Err(FrameError::HeaderTooLarge(_))
        ));
        let big = Response::Error {
            code: ErrorCode::Io,
            message: "x".repeat(MAX_HEADER),
        };
        assert!(matches!(
            encode_frame(&big, b""),
            Err(FrameError::HeaderTooLarge(_))
        ));
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut full = Vec::new();
        write_frame(&mut full, &Response::Stdout, b"hello").unwrap();
        for cut in 1..full.len() {
            let err = read_frame(&mut Cursor::new(&full[..cut])).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn bad_json_and_empty_header() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&3u32.to_be_bytes());
        raw.extend_from_slice(&0u32.to_be_bytes());
        raw.extend_from_slice(b"{x}");
        assert!(matches!(
            read_message::<_, Request>(&mut Cursor::new(raw)),
            Err(FrameError::Json(_))
        ));
        let raw = [0u8; 8];
        assert!(matches!(
            read_frame(&mut Cursor::new(raw)),
            Err(FrameError::EmptyHeader)
        ));
    }
}
