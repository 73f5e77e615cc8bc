#!/usr/bin/env bash
# Verifies dist/anvil.service with `systemd-analyze verify` and dist/tmpfiles-anvil.conf with
# `systemd-tmpfiles` in a scratch root. Any warning fails (systemd-analyze exits 0 on unknown
# keys and unparsable values, so its output is checked too).
#
# Usage: scripts/verify-unit.sh [ANVIL_BINARY]
# verify insists that ExecStart's /usr/bin/anvil exists. Rather than installing anything on
# the host, the check runs in a private mount namespace where an overlay puts the given
# binary (default: a stand-in executable) at /usr/bin/anvil. Needs root (unshare, overlay).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="$repo/dist/anvil.service"
tmpfiles="$repo/dist/tmpfiles-anvil.conf"
log() { printf '[verify-unit] %s\n' "$*" >&2; }

if ! command -v systemd-analyze >/dev/null || ! command -v systemd-tmpfiles >/dev/null; then
    log "installing Debian's systemd (systemd-analyze, systemd-tmpfiles)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd >/dev/null
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/bin"
if [[ $# -ge 1 ]]; then
    install -m 0755 "$1" "$scratch/bin/anvil"
else
    install -m 0755 /bin/true "$scratch/bin/anvil"
fi

out="$scratch/verify.out"
# The overlay exists only inside this namespace and vanishes with it.
if ! unshare --mount --propagation private sh -c '
        mount -t overlay anvil-verify -o "lowerdir=$1:/usr/bin" /usr/bin &&
        exec systemd-analyze verify "$2"' sh "$scratch/bin" "$unit" >"$out" 2>&1; then
    cat "$out" >&2
    log "FAIL: systemd-analyze verify $unit"
    exit 1
fi
if [[ -s "$out" ]]; then
    cat "$out" >&2
    log "FAIL: systemd-analyze verify printed warnings for $unit"
    exit 1
fi
log "ok: systemd-analyze verify $unit"

# tmpfiles: create in a scratch root and check the result.
root="$scratch/root"
mkdir -p "$root"
if ! systemd-tmpfiles --create --root="$root" "$tmpfiles" >"$out" 2>&1 || [[ -s "$out" ]]; then
    cat "$out" >&2
    log "FAIL: systemd-tmpfiles --create $tmpfiles"
    exit 1
fi
for want in "run/anvil 755" "var/lib/anvil 711"; do
    set -- $want
    got="$(stat -c %a "$root/$1" 2>/dev/null || echo missing)"
    if [[ "$got" != "$2" ]]; then
        log "FAIL: tmpfiles created /$1 with mode $got, expected $2"
        exit 1
    fi
done
log "ok: systemd-tmpfiles --create $tmpfiles"
