//! Starting one Firecracker process: plain (private mount namespace) or under the jailer.

use super::layout::{self, VmDir};
use crate::cgroup::{join_cgroup_raw, ProcsFds};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What to run and how.
pub struct Launch<'a> {
    pub firecracker: &'a Path,
    pub vmm_id: &'a str,
    pub vm_dir: &'a VmDir,
    /// Plain mode: the fixed path the VM dir is bind-mounted onto inside the VMM's namespace.
    pub vm_root: &'a Path,
    /// Jailer mode: (jailer binary, chroot base, uid, gid).
    pub jailer: Option<(&'a Path, &'a Path, u32, u32)>,
    /// Serial console + early VMM output; `None` = /dev/null.
    pub console: Option<File>,
    pub cgroup: Option<&'a ProcsFds>,
    /// Firecracker's log level (`--level`); its log and metrics files are the VM dir's
    /// `firecracker.log` / `metrics.json`, configured on the command line rather than by two
    /// API calls, which saves their round trips on every start.
    pub log_level: &'a str,
}

/// Spawns the VMM in its own process group (so signals to the daemon's group — e.g. a
/// Ctrl-C of a foreground daemon — do not reach it; it survives a daemon crash). Returns its
/// pid. The `Child` handle is dropped on purpose: VMs outlive the daemon and are tracked by
/// pid + start time; `watch::reap` collects our own exited children.
pub fn spawn(l: Launch<'_>) -> io::Result<i32> {
    let mut cmd = match l.jailer {
        None => {
            let mut c = Command::new(l.firecracker);
            c.arg("--api-sock")
                .arg(l.vm_dir.vmm(layout::API_SOCK))
                .arg("--id")
                .arg(l.vmm_id);
            c
        }
        Some((jailer, chroot_base, uid, gid)) => {
            let mut c = Command::new(jailer);
            c.arg("--id")
                .arg(l.vmm_id)
                .arg("--exec-file")
                .arg(l.firecracker)
                .arg("--uid")
                .arg(uid.to_string())
                .arg("--gid")
                .arg(gid.to_string())
                .arg("--chroot-base-dir")
                .arg(chroot_base)
                .arg("--")
                .arg("--api-sock")
                .arg(l.vm_dir.vmm(layout::API_SOCK));
            c
        }
    };
    cmd.arg("--log-path")
        .arg(l.vm_dir.vmm(layout::FC_LOG))
        .arg("--level")
        .arg(l.log_level)
        .arg("--show-level")
        .arg("--metrics-path")
        .arg(l.vm_dir.vmm(layout::METRICS));
    cmd.stdin(Stdio::null()).process_group(0);
    match l.console {
        Some(f) => {
            let f2 = f.try_clone()?;
            cmd.stdout(f).stderr(f2);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }

    let cgroup_fds: Vec<RawFd> = l.cgroup.map(|p| p.raw()).unwrap_or_default();
    // Prepared before fork: the child may not allocate.
    let bind = match l.jailer {
        None => Some((cstr(&l.vm_dir.host)?, cstr(l.vm_root)?)),
        Some(_) => None,
    };
    // SAFETY: the closure only makes async-signal-safe syscalls on pre-built buffers.
    unsafe {
        cmd.pre_exec(move || {
            // Join the cgroup before exec so every byte the VMM allocates is accounted.
            join_cgroup_raw(&cgroup_fds)?;
            if let Some((src, dst)) = &bind {
                private_vm_root(src, dst)?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(child.id() as i32)
}

/// In the child: a private mount namespace in which `src` (this VM's directory) appears at
/// `dst` (the fixed `vm_root`), so paths stored in snapshots are the same for every VM.
fn private_vm_root(src: &CString, dst: &CString) -> io::Result<()> {
    // SAFETY: raw syscalls with valid NUL-terminated strings; no allocation.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Slave: host mounts still propagate in, ours never propagate out.
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {} contains NUL", p.display()),
        )
    })
}

/// Hard-links `src` to `dst` (same file system: instant, shares the page cache); copies when
/// they are on different file systems.
pub fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => std::fs::copy(src, dst).map(|_| ()),
        Err(e) => Err(e),
    }
}

/// Moves `src` to `dst`, copying across file systems.
pub fn move_file(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(src, dst)?;
            std::fs::remove_file(src)
        }
        Err(e) => Err(e),
    }
}

pub fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// Creates an empty file (truncating) that the VMM will open by path.
pub fn touch(path: &Path) -> io::Result<PathBuf> {
    File::create(path)?;
    Ok(path.to_path_buf())
}
