#!/usr/bin/env bash
# Installs and builds everything anvil and its tests need on a fresh Debian 12 machine (root):
#   - Debian packages: bubblewrap, busybox-static, e2fsprogs, cpio, lz4, file, iproute2
#   - Firecracker v1.12.1 + jailer (scripts/install-firecracker.sh, sha256-pinned wheel)
#   - the static guest agent (scripts/build-agent.sh)
#   - the default busybox rootfs template under .anvil/images/busybox
# Idempotent: a second run only checks. Progress goes to stderr.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf '[setup] %s\n' "$*" >&2; }

packages=(bubblewrap busybox-static e2fsprogs cpio lz4 file iproute2 procps)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
else
    log "Debian packages present"
fi

if [[ -e /dev/kvm || ${ANVIL_INSTALL_FIRECRACKER:-1} == 1 ]]; then
    log "Firecracker"
    scripts/install-firecracker.sh /usr/local/bin
fi

log "building the static guest agent"
scripts/build-agent.sh >/dev/null

log "building the busybox template into .anvil/images/busybox"
scripts/build-busybox-template.sh "$repo/.anvil/images/busybox" >/dev/null
log "done"
