//! Files: read (streamed), write (temp file + rename, with mode), list.

use crate::server::Session;
use anvil_protocol::{
    validate_path, DirEntry, EntryKind, ErrorCode, Request, Response, CHUNK_SIZE,
};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

type Failure = (ErrorCode, String);

fn io_failure(what: &str, path: &Path, e: &io::Error) -> Failure {
    (
        ErrorCode::from_io(e),
        format!("{what} {}: {e}", path.display()),
    )
}

pub fn read(s: &Session, path: &str) {
    if let Err((code, msg)) = read_inner(s, path) {
        s.send_error(code, msg);
    }
}

fn read_inner(s: &Session, path: &str) -> Result<(), Failure> {
    validate_path(path).map_err(|m| (ErrorCode::Invalid, m))?;
    let p = Path::new(path);
    // O_NONBLOCK: opening a FIFO must not hang the agent.
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| io_failure("open", p, &e))?;
    let meta = f.metadata().map_err(|e| io_failure("stat", p, &e))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err((ErrorCode::Invalid, format!("{path} is a directory")));
    }
    if ft.is_fifo() || ft.is_socket() {
        return Err((ErrorCode::Invalid, format!("{path} is not a regular file")));
    }
    let header = Response::File {
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    };
    if s.send(&header, &[]).is_err() {
        return Ok(()); // host gone
    }
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure("read", p, &e)),
        };
        if s.send(&Response::Data, &buf[..n]).is_err() {
            return Ok(());
        }
    }
    let _ = s.send(&Response::Eof, &[]);
    Ok(())
}

/// A temp file next to the target, removed unless renamed into place.
struct Staged {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn stage(path: &str) -> Result<Staged, Failure> {
    validate_path(path).map_err(|m| (ErrorCode::Invalid, m))?;
    let target = PathBuf::from(path);
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err((ErrorCode::Invalid, format!("{path} does not name a file")));
    };
    if path.ends_with('/') {
        return Err((ErrorCode::Invalid, format!("{path} does not name a file")));
    }
    let pmeta =
        std::fs::metadata(parent).map_err(|e| io_failure("parent directory", parent, &e))?;
    if !pmeta.is_dir() {
        return Err((
            ErrorCode::Invalid,
            format!("{} is not a directory", parent.display()),
        ));
    }
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = parent.join(format!(
        ".{}.anvil-{}-{n}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_failure("create", &tmp, &e))?;
    Ok(Staged {
        file,
        tmp,
        target,
        done: false,
    })
}

/// Reads `data` frames until `eof` into a staged file, then renames it over the target.
/// An early failure is answered at once, and the rest of the data is still consumed so the
/// host (which writes everything before reading) gets the answer.
pub fn write(s: &Session, path: &str, mode: u32, size: u64) {
    let mut staged = match stage(path) {
        Ok(st) => Some(st),
        Err((code, msg)) => {
            s.send_error(code, msg);
            None
        }
    };
    let mut failed = staged.is_none();
    let mut written: u64 = 0;
    loop {
        match s.recv() {
            Ok(Some((Request::Data, body))) => {
                written += body.len() as u64;
                if let Some(st) = staged.as_mut() {
                    if written > size {
                        s.send_error(
                            ErrorCode::Invalid,
                            format!("more data than the announced {size} bytes"),
                        );
                        staged = None;
                        failed = true;
                    } else if let Err(e) = st.file.write_all(&body) {
                        let (code, msg) = io_failure("write", &st.tmp, &e);
                        s.send_error(code, msg);
                        staged = None;
                        failed = true;
                    }
                }
            }
            Ok(Some((Request::Eof, _))) => break,
            Ok(Some(_)) => {
                s.send_error(ErrorCode::Invalid, "expected data or eof frames");
                return;
            }
            // Host gone or broken frame: `staged` removes the temp file.
            Ok(None) | Err(_) => return,
        }
    }
    if failed {
        return;
    }
    let Some(mut st) = staged else { return };
    match finish(&mut st, mode, size, written) {
        Ok(()) => {
            let _ = s.send(&Response::Written { bytes: written }, &[]);
        }
        Err((code, msg)) => s.send_error(code, msg),
    }
}

fn finish(st: &mut Staged, mode: u32, size: u64, written: u64) -> Result<(), Failure> {
    if written != size {
        return Err((
            ErrorCode::Invalid,
            format!("got {written} bytes, announced {size}"),
        ));
    }
    // Explicit chmod: the umask must not change the requested mode.
    st.file
        .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| io_failure("chmod", &st.tmp, &e))?;
    std::fs::rename(&st.tmp, &st.target).map_err(|e| io_failure("rename onto", &st.target, &e))?;
    st.done = true;
    Ok(())
}

pub fn list(s: &Session, path: &str) {
    match list_inner(path) {
        Ok(entries) => {
            let _ = s.send(&Response::Listing { entries }, &[]);
        }
        Err((code, msg)) => s.send_error(code, msg),
    }
}

fn list_inner(path: &str) -> Result<Vec<DirEntry>, Failure> {
    validate_path(path).map_err(|m| (ErrorCode::Invalid, m))?;
    let p = Path::new(path);
    let dir = std::fs::read_dir(p).map_err(|e| io_failure("list", p, &e))?;
    let mut entries = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| io_failure("list", p, &e))?;
        // Entries can vanish while listing; skip those.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            EntryKind::File
        } else if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::Other
        };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind,
            size: meta.size(),
            mode: meta.mode() & 0o7777,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}
