#!/usr/bin/env bash
# Builds a minimal root filesystem for bubblewrap sandboxes from Debian's busybox-static.
#
#   scripts/build-busybox-template.sh OUT_DIR
#
# OUT_DIR gets bin/ sbin/ usr/bin/ usr/sbin/ etc/ proc/ sys/ dev/ tmp/ run/ root/, a static
# /bin/busybox with one symlink per applet, and /etc/{passwd,group,hostname}. Takes seconds;
# running it again over the same OUT_DIR is fine (idempotent).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out=$1
busybox=/bin/busybox

log() { echo "[busybox-template] $*"; }

if ! [[ -x $busybox ]] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    if ! dpkg -s busybox-static >/dev/null 2>&1; then
        log "installing busybox-static (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null
    fi
fi
if ! [[ -x $busybox ]]; then
    echo "error: $busybox missing after installing busybox-static" >&2
    exit 1
fi

log "creating layout in $out"
mkdir -p "$out"
for d in bin sbin usr/bin usr/sbin etc proc sys dev tmp run root; do
    mkdir -p "$out/$d"
done
chmod 1777 "$out/tmp"
chmod 0700 "$out/root"

log "copying $busybox ($("$busybox" 2>&1 | head -n1 | cut -d' ' -f1-2))"
install -m 0755 "$busybox" "$out/bin/busybox.new"
mv -f "$out/bin/busybox.new" "$out/bin/busybox"

log "installing applet symlinks"
# Same result as `busybox --install -s` run inside the tree (absolute links to /bin/busybox),
# without needing chroot: link each applet of `--list-full` ourselves.
count=0
while IFS= read -r applet; do
    [[ -z $applet ]] && continue
    name=${applet##*/}
    [[ $name == busybox ]] && continue
    if [[ $applet == */* ]]; then
        mkdir -p "$out/${applet%/*}"
    fi
    if [[ ! -e $out/$applet && ! -L $out/$applet ]]; then
        ln -s /bin/busybox "$out/$applet"
    fi
    count=$((count + 1))
done < <("$busybox" --list-full)
log "$count applets linked"

log "writing /etc files"
cat >"$out/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$out/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo sandbox >"$out/etc/hostname"
: >"$out/etc/resolv.conf"
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/hostname" "$out/etc/resolv.conf"

log "done: $(du -sh "$out" | cut -f1) in $out"
