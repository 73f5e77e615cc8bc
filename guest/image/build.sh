#!/usr/bin/env bash
# Builds the anvil VM guest image from Debian packages:
#
#   guest/image/build.sh OUT_DIR
#
# OUT_DIR gets
#   vmlinux             ELF kernel (Debian's cloud kernel, decompressed from its LZ4 bzImage)
#   initramfs.cpio.gz   busybox + the virtio/virtio-mmio/virtio-blk/vsock/overlay modules + /init
#   rootfs.ext4         busybox userland + /sbin/anvil-agent (mounted read-only under a tmpfs overlay)
#   kernel-version.txt  what `uname -r` says in the guest
# Layout and boot flow: docs/firecracker.md, "Guest image and QEMU harness".
#
# Inputs: the kernel package (linux-image-cloud-amd64's dependency, or $ANVIL_GUEST_KERNEL_PKG),
# /bin/busybox from busybox-static, the static agent ($ANVIL_AGENT_BIN, else
# scripts/build-agent.sh), and this directory's files. A rebuild with the same inputs is a
# no-op (sha256 of all of them in OUT_DIR/.inputs). Downloads are cached in
# $ANVIL_CACHE_DIR/guest-image (default <repo>/.cache/guest-image). Needs root only to
# install missing Debian packages; nothing is installed into the host's /boot or /lib/modules.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cache="${ANVIL_CACHE_DIR:-$repo/.cache}/guest-image"
export LC_ALL=C

# Modules the guest loads, in an order that satisfies their `depends=` (checked below).
MODULES=(virtio_ring virtio virtio_mmio virtio_blk overlay vsock
    vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)

started=$SECONDS
log() { echo "[guest-image] $*"; }
die() {
    echo "[guest-image] error: $*" >&2
    exit 1
}

# --- host tools ----------------------------------------------------------------------------
need_pkgs=()
for tool in busybox:busybox-static mkfs.ext4:e2fsprogs cpio:cpio lz4:lz4 gzip:gzip \
    dpkg-deb:dpkg xz:xz-utils zstd:zstd readelf:binutils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool#*:}")
done
# The static busybox specifically (the dynamic one would not run in the guest).
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
if ((${#need_pkgs[@]})); then
    log "installing Debian packages: ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null
fi
busybox=/bin/busybox
file_is_static() {
    local headers
    headers=$(readelf -l "$1" 2>/dev/null) || return 1
    ! grep -q INTERP <<<"$headers"
}
[[ -x $busybox ]] || die "$busybox missing (busybox-static)"

# --- the kernel package ----------------------------------------------------------------------
# One apt-cache call (it is slow where apt keeps no binary cache): the metapackage depends on
# the exact kernel package version, `linux-image-<abi>-cloud-amd64 (= <version>)`.
resolve_kernel() {
    if [[ -n ${ANVIL_GUEST_KERNEL_PKG:-} ]]; then
        apt-cache show --no-all-versions "$ANVIL_GUEST_KERNEL_PKG" 2>/dev/null |
            sed -n "s/^Version: \(.*\)$/$ANVIL_GUEST_KERNEL_PKG \1/p" | head -n1
    else
        apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
            sed -n 's/^Depends: .*\(linux-image-[^ ,]*-cloud-amd64\) (= \([^)]*\)).*$/\1 \2/p' |
            head -n1
    fi
}
kernel=$(resolve_kernel)
if [[ -z $kernel ]]; then
    log "apt does not know the kernel package; running apt-get update"
    apt-get update -q >/dev/null
    kernel=$(resolve_kernel)
fi
[[ -n $kernel ]] || die "cannot resolve the kernel package (${ANVIL_GUEST_KERNEL_PKG:-linux-image-cloud-amd64})"
read -r kernel_pkg kernel_ver <<<"$kernel"
log "kernel package $kernel_pkg $kernel_ver"

# --- the agent -------------------------------------------------------------------------------
agent=${ANVIL_AGENT_BIN:-}
if [[ -z $agent ]]; then
    log "building the static agent (scripts/build-agent.sh)"
    agent=$("$repo/scripts/build-agent.sh" | tail -n1)
fi
[[ -x $agent ]] || die "agent binary $agent missing or not executable"
file_is_static "$agent" || die "agent binary $agent is dynamically linked (build it with crt-static)"

# --- up to date? -----------------------------------------------------------------------------
inputs=$(
    {
        echo "kernel $kernel_pkg $kernel_ver"
        echo "modules ${MODULES[*]}"
        sha256sum "$busybox" "$agent" "$here"/build.sh "$here"/init.sh | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)
outputs=(vmlinux initramfs.cpio.gz rootfs.ext4 kernel-version.txt)
up_to_date=1
for f in "${outputs[@]}"; do [[ -s $out/$f ]] || up_to_date=0; done
if ((up_to_date)) && [[ $(cat "$out/.inputs" 2>/dev/null) == "$inputs" ]]; then
    log "up to date in $out (inputs $inputs)"
    exit 0
fi

# --- download + unpack the kernel package (cached) -----------------------------------------
kcache="$cache/$kernel_pkg-$kernel_ver"
if [[ ! -f $kcache/.unpacked ]]; then
    rm -rf "$kcache"
    mkdir -p "$kcache/dl"
    log "downloading $kernel_pkg $kernel_ver (apt-get download; not installed on the host)"
    # apt's sandbox user cannot write into root-owned cache dirs; that warning is harmless.
    (cd "$kcache/dl" && apt-get download -qq "$kernel_pkg=$kernel_ver" 2>&1 | grep -v 'unsandboxed' >&2 || true)
    deb=$(ls "$kcache"/dl/*.deb 2>/dev/null | head -n1)
    if [[ -z $deb ]]; then
        rm -rf "$kcache"
        # Stale apt lists name a version the mirror no longer has: refresh once, start over.
        [[ -z ${ANVIL_GUEST_IMAGE_RETRY:-} ]] || die "apt-get download $kernel_pkg=$kernel_ver failed"
        log "download failed; running apt-get update and starting over"
        apt-get update -q >/dev/null
        ANVIL_GUEST_IMAGE_RETRY=1 exec "$0" "$out"
    fi
    log "unpacking $(basename "$deb") ($(du -h "$deb" | cut -f1))"
    dpkg-deb -x "$deb" "$kcache/root"
    rm -rf "$kcache/dl"
    touch "$kcache/.unpacked"
    # Older kernels' trees are not needed any more.
    find "$cache" -mindepth 1 -maxdepth 1 -name 'linux-image-*' ! -path "$kcache" -exec rm -rf {} +
else
    log "kernel package cached in $kcache"
fi
kroot=$kcache/root
vmlinuz=$(ls "$kroot"/boot/vmlinuz-* 2>/dev/null | head -n1)
[[ -n $vmlinuz ]] || die "no /boot/vmlinuz-* in $kernel_pkg"
uname_r=${vmlinuz##*/vmlinuz-}
moddir=$kroot/lib/modules/$uname_r
[[ -d $moddir ]] || die "no $moddir"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/anvil-guest-image.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- vmlinux ---------------------------------------------------------------------------------
# Like the kernel's scripts/extract-vmlinux: decompress from each LZ4 (legacy) magic until
# the result is an ELF file. Trailing data after the stream makes lz4 complain; ignore that.
log "extracting vmlinux from $(basename "$vmlinuz")"
found=0
for off in $(grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | cut -d: -f1); do
    tail -c "+$((off + 1))" "$vmlinuz" | lz4 -dc >"$tmp/vmlinux" 2>/dev/null || true
    if [[ $(head -c4 "$tmp/vmlinux" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
        found=1
        break
    fi
done
((found)) || die "no LZ4-compressed ELF kernel found in $vmlinuz"

# --- modules ---------------------------------------------------------------------------------
# Debian ships these uncompressed today; handle .ko.xz/.ko.zst too (busybox insmod cannot).
find_module() {
    find "$moddir/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" \) | head -n1
}
mkdir -p "$tmp/initramfs/lib/modules/$uname_r"
loaded=" "
for m in "${MODULES[@]}"; do
    src=$(find_module "$m")
    [[ -n $src ]] || die "module $m not found in $kernel_pkg (built in? then drop it from MODULES)"
    dst="$tmp/initramfs/lib/modules/$uname_r/$m.ko"
    case $src in
    *.xz) xz -dc "$src" >"$dst" ;;
    *.zst) zstd -qdc "$src" >"$dst" ;;
    *) cp "$src" "$dst" ;;
    esac
    # The .modinfo section holds NUL-separated key=value strings, one of them `depends=`.
    deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
    for d in $deps; do
        [[ $loaded == *" $d "* ]] || die "module $m needs $d, which is not loaded before it"
    done
    loaded+="$m "
    echo "$m" >>"$tmp/initramfs/lib/modules/load-order"
done
echo "$uname_r" >"$tmp/initramfs/lib/modules/version"
log "modules: ${MODULES[*]}"

# --- initramfs -------------------------------------------------------------------------------
log "building initramfs.cpio.gz"
ir=$tmp/initramfs
mkdir -p "$ir/bin" "$ir/proc" "$ir/sys" "$ir/dev" "$ir/newroot" "$ir/mnt"
install -m 0755 "$busybox" "$ir/bin/busybox"
for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$ir/bin/$applet"
done
install -m 0755 "$here/init.sh" "$ir/init"
# Sorted names and fixed mtimes: the same inputs give the same archive.
(cd "$ir" && find . -mindepth 1 -print0 | sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9n >"$tmp/initramfs.cpio.gz"

# --- rootfs ----------------------------------------------------------------------------------
log "building rootfs.ext4"
rf=$tmp/rootfs
"$repo/scripts/build-busybox-template.sh" "$rf" >/dev/null
mkdir -p "$rf/sbin" "$rf/mnt" "$rf/var/tmp"
install -m 0755 "$agent" "$rf/sbin/anvil-agent"
echo "$uname_r" >"$rf/etc/anvil-kernel-version"
size_mb=$(($(du -sm "$rf" | cut -f1) + 32))
# No journal: the image is only ever mounted read-only. -E root_owner: files owned by root
# whoever builds it.
mkfs.ext4 -q -F -L anvil-rootfs -O ^has_journal -E root_owner=0:0 -d "$rf" \
    "$tmp/rootfs.ext4" "${size_mb}M" >/dev/null

# --- publish ---------------------------------------------------------------------------------
echo "$uname_r" >"$tmp/kernel-version.txt"
rm -f "$out/.inputs"
for f in "${outputs[@]}"; do
    mv -f "$tmp/$f" "$out/$f"
done
echo "$inputs" >"$out/.inputs"
log "done in $((SECONDS - started)) s: $out (kernel $uname_r;" \
    "vmlinux $(du -h "$out/vmlinux" | cut -f1), initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1)," \
    "rootfs $(du -h --apparent-size "$out/rootfs.ext4" | cut -f1))"
