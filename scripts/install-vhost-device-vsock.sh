#!/usr/bin/env bash
# Installs vhost-device-vsock (rust-vmm, crates.io), the vhost-user vsock device the QEMU test
# harness gives the guest. Its host side is the same Unix-socket protocol as Firecracker's
# vsock (`CONNECT <port>\n` to reach the guest; guest connections to port P arrive on
# `<uds-path>_P`), so the real guest image and agent are tested through anvil's own client.
#
# Usage: scripts/install-vhost-device-vsock.sh      (prints the binary's path as its last line)
# Env:   CARGO_INSTALL_ROOT  install root (default <repo>/.cache/cargo-bin → bin/ below it)
#        CARGO               cargo command (default cargo)
# Idempotent: nothing is built when the pinned version is already installed there.
# Takes ~3-4 min on 2 cores when cold (see docs/firecracker.md).
set -euo pipefail

VERSION="0.3.0"
CRATE="vhost-device-vsock"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${CARGO_INSTALL_ROOT:-$repo_root/.cache/cargo-bin}"
bin="$root/bin/$CRATE"
cargo="${CARGO:-cargo}"

log() { printf 'install-vhost-device-vsock: %s\n' "$*" >&2; }

# `cargo install` records what it installed in <root>/.crates.toml; a `--version` check
# would need the binary to support it (0.3.0 prints "vhost-device-vsock 0.3.0").
installed() {
    [ -x "$bin" ] && grep -q "^\"$CRATE $VERSION " "$root/.crates.toml" 2>/dev/null
}

if installed; then
    log "$CRATE $VERSION already installed in $root"
else
    log "building $CRATE $VERSION with cargo install --locked (a few minutes on 2 cores)"
    started=$SECONDS
    # Its own target dir under the root: never shares (or locks) the workspace's.
    CARGO_TARGET_DIR="$root/build" "$cargo" install --locked --quiet \
        --root "$root" "$CRATE" --version "$VERSION"
    rm -rf "$root/build"
    installed || { log "error: $bin missing after cargo install"; exit 1; }
    log "built in $((SECONDS - started)) s"
fi
echo "$bin"
