//! Sockets: Unix (std) and vsock (libc), both handled as plain file descriptors.

use crate::args::Addr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// A connected stream. `&Conn` implements Read and Write, so one thread can read while
/// others write (frame writes are serialized by the caller).
#[derive(Debug)]
pub struct Conn(OwnedFd);

impl Conn {
    /// Stops both directions; unblocks a thread reading from this connection.
    pub fn shutdown(&self) {
        // SAFETY: plain syscall on a descriptor we own.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid; MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.0.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct Listener(OwnedFd);

impl Listener {
    pub fn accept(&self) -> io::Result<Conn> {
        loop {
            // SAFETY: accept4 with null address pointers is allowed.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fd is a fresh descriptor we own.
                return Ok(Conn(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

pub fn listen(addr: &Addr) -> io::Result<Listener> {
    match addr {
        Addr::Unix(path) => listen_unix(path),
        Addr::Vsock { port, .. } => {
            let fd = vsock_socket()?;
            let sa = vsock_addr(libc::VMADDR_CID_ANY, *port);
            // SAFETY: sa is a valid sockaddr_vm of the given length.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_vm).cast(),
                    sockaddr_vm_len(),
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: plain syscall.
            if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Listener(fd))
        }
    }
}

fn listen_unix(path: &Path) -> io::Result<Listener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        // A stale socket from an earlier run.
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Listener(l.into()))
}

pub fn connect(addr: &Addr) -> io::Result<Conn> {
    match addr {
        Addr::Unix(path) => Ok(Conn(UnixStream::connect(path)?.into())),
        Addr::Vsock { cid, port } => {
            let fd = vsock_socket()?;
            let sa = vsock_addr(*cid, *port);
            loop {
                // SAFETY: sa is a valid sockaddr_vm of the given length.
                let r = unsafe {
                    libc::connect(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_vm).cast(),
                        sockaddr_vm_len(),
                    )
                };
                if r == 0 {
                    return Ok(Conn(fd));
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    sa
}

fn sockaddr_vm_len() -> libc::socklen_t {
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t
}
