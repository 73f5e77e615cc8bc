#!/usr/bin/env bash
# Installs and builds everything anvil and its tests need on a fresh Debian 12 machine (root):
#   - Debian packages: bubblewrap, busybox-static, e2fsprogs, cpio, lz4, file, iproute2
#   - Firecracker v1.12.1 + jailer (scripts/install-firecracker.sh, sha256-pinned wheel)
#   - the static guest agent (scripts/build-agent.sh)
#   - the default busybox rootfs template under .anvil/images/busybox
#   - for the VM guest image tests: QEMU, vhost-device-vsock (cargo install, cached under
#     .cache/cargo-bin) and the guest image (Debian cloud kernel, initramfs, rootfs.ext4)
#     under .anvil/images/guest
# Idempotent: a second run only checks. Progress goes to stderr.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf '[setup] %s\n' "$*" >&2; }

packages=(bubblewrap busybox-static e2fsprogs cpio lz4 file iproute2 procps binutils xz-utils zstd qemu-system-x86 rpm dpkg-dev systemd)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
else
    log "Debian packages present"
fi

if [[ -e /dev/kvm || ${ANVIL_INSTALL_FIRECRACKER:-1} == 1 ]]; then
    log "Firecracker"
    scripts/install-firecracker.sh /usr/local/bin
fi

log "building the static guest agent"
agent=$(scripts/build-agent.sh | tail -n1)

log "building the busybox template into .anvil/images/busybox"
scripts/build-busybox-template.sh "$repo/.anvil/images/busybox" >/dev/null

if [[ ${ANVIL_SETUP_VM_IMAGE:-1} == 1 ]]; then
    log "vhost-device-vsock (QEMU vsock for the guest image tests)"
    scripts/install-vhost-device-vsock.sh >/dev/null
    log "building the VM guest image into .anvil/images/guest"
    ANVIL_AGENT_BIN="$agent" guest/image/build.sh "$repo/.anvil/images/guest" >/dev/null
fi
log "done"
