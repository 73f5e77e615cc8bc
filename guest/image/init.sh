#!/bin/busybox sh
# /init of the anvil guest initramfs (see guest/image/build.sh and docs/firecracker.md).
#
# 1. mounts /proc, /sys, /dev; 2. loads the virtio, virtio-mmio, virtio-blk, vsock and
# overlay modules listed in /lib/modules/load-order (the Debian cloud kernel builds them as
# modules); 3. mounts the read-only rootfs (/dev/vda, ext4) under a writable overlay whose
# upper layer is a tmpfs in guest memory (so a memory snapshot also captures every file the
# sandbox wrote, and the shared rootfs image is never written); 4. switch_root into it and
# exec the agent as pid 1.
#
# Any failure exits, which panics the kernel; with `panic=1 reboot=k` the VMM then exits,
# so the host sees the failure at once instead of waiting for a ready that never comes.

export PATH=/bin
AGENT=/sbin/anvil-agent
AGENT_ARGS="--listen vsock:1024 --notify vsock:2:1025 --init"

fail() {
    echo "anvil-init: error: $*" >&2
    exit 1
}

mkdir -p /proc /sys /dev /newroot /mnt/lower /mnt/rw
mount -t proc -o nosuid,nodev,noexec proc /proc || fail "mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "mount /dev"
# The kernel found no /dev/console in the initramfs; use the real one from now on.
exec </dev/console >/dev/console 2>&1

kver=$(cat /lib/modules/version)
echo "anvil-init: kernel $(uname -r), loading modules"
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$kver/$mod.ko" || fail "insmod $mod"
done </lib/modules/load-order

# virtio-mmio devices are probed when virtio_mmio loads; the block device node appears
# asynchronously (devtmpfs), so wait for it briefly (≤5 s, TCG is slow).
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -le 500 ] || fail "no /dev/vda (is the rootfs drive attached?)"
    usleep 10000
done

mount -t ext4 -o ro /dev/vda /mnt/lower || fail "mount /dev/vda (ext4, ro)"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "mount tmpfs for the overlay"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \
    overlay /newroot || fail "mount overlay root"
[ -x "/newroot$AGENT" ] || fail "$AGENT missing from the rootfs"

# Hand /proc, /sys and /dev over to the new root (the console stays open on /dev); the
# agent's --init sees them mounted and adds /dev/shm, /tmp and /run.
for m in proc sys dev; do
    mkdir -p "/newroot/$m"
    mount --move "/$m" "/newroot/$m" || fail "move /$m into the new root"
done
echo "anvil-init: starting $AGENT $AGENT_ARGS"
# shellcheck disable=SC2086 # word splitting of AGENT_ARGS is intended
exec switch_root /newroot "$AGENT" $AGENT_ARGS
