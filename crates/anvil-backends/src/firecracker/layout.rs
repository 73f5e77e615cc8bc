//! Where one VM's files live, seen from the host and from inside the VMM.
//!
//! Firecracker stores the paths it was configured with (vsock socket, drives) inside a
//! snapshot, so every VMM must see its own files at the *same* path for many VMs to restore
//! one snapshot concurrently. Two ways, one per mode:
//! - plain: each VMM runs in a private mount namespace where the VM's host directory
//!   `<instance_dir>/vm` is bind-mounted onto the fixed `vm_root` (see `spawn.rs`);
//! - jailer: each VMM is chrooted into `<chroot_base>/firecracker/<jail_id>/root`, and sees it as `/`.

use std::path::{Path, PathBuf};

/// API socket, relative to the VM directory.
pub const API_SOCK: &str = "fc.sock";
/// Vsock backing socket (host-initiated: `CONNECT <port>`; guest-initiated: `v.sock_<port>`).
pub const VSOCK_UDS: &str = "v.sock";
pub const FC_LOG: &str = "fc.log";
pub const METRICS: &str = "metrics.json";
/// In-jail names of template files linked into the chroot.
pub const JAIL_KERNEL: &str = "kernel";
pub const JAIL_INITRD: &str = "initrd";
pub const JAIL_ROOTFS: &str = "rootfs.img";
/// Snapshot files inside a snapshot or checkpoint directory.
pub const SNAP_VMSTATE: &str = "vmstate";
pub const SNAP_MEM: &str = "mem";
pub const SNAP_META: &str = "snapshot.json";
/// In-jail directory a snapshot is linked into for restore / written into for checkpoints.
pub const JAIL_SNAP_DIR: &str = "snap";

/// The VM directory: `host` is where the daemon finds it, `vmm` is how Firecracker names it.
#[derive(Debug, Clone)]
pub struct VmDir {
    pub host: PathBuf,
    pub vmm: PathBuf,
}

impl VmDir {
    pub fn host(&self, name: &str) -> PathBuf {
        self.host.join(name)
    }
    pub fn vmm(&self, name: &str) -> PathBuf {
        self.vmm.join(name)
    }
}

/// Firecracker and the jailer accept ids of `[A-Za-z0-9-]`, at most 64 characters.
pub fn vmm_id(id: &str) -> String {
    let mut s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(64);
    if s.is_empty() {
        s.push_str("vm");
    }
    s
}

/// `<chroot_base>/<exec file name>/<jail id>`: the jailer's directory for one VM (its
/// chroot is `root/` inside).
pub fn jail_dir(chroot_base: &Path, firecracker: &Path, jail_id: &str) -> PathBuf {
    let exec_name = firecracker
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "firecracker".into());
    chroot_base.join(exec_name).join(jail_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_sanitized_for_firecracker() {
        assert_eq!(vmm_id("sbx_01.a"), "sbx-01-a");
        assert_eq!(vmm_id(""), "vm");
        assert_eq!(vmm_id(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn jail_dir_follows_jailer_convention() {
        assert_eq!(
            jail_dir(
                Path::new("/srv/jailer"),
                Path::new("/usr/bin/firecracker"),
                "a-1"
            ),
            PathBuf::from("/srv/jailer/firecracker/a-1")
        );
    }
}
