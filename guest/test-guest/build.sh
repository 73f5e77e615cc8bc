#!/usr/bin/env bash
# Builds the Firecracker test guest (an ELF "vmlinux") with binutils and prints its path.
# Usage: guest/test-guest/build.sh [OUT_DIR]   (default <repo>/.cache/test-guest)
# Cached: rebuilt only when the sources change (keyed by their sha256).
set -euo pipefail
src_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out_dir="${1:-$src_dir/../../.cache/test-guest}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
key="$(cat "$src_dir/guest.S" "$src_dir/link.ld" "$src_dir/build.sh" | sha256sum | cut -c1-16)"
out="$out_dir/test-guest-$key.elf"
if [ ! -s "$out" ]; then
    tmp="$(mktemp -d "$out_dir/build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    as --64 -o "$tmp/guest.o" "$src_dir/guest.S"
    ld -m elf_x86_64 -static -nostdlib --build-id=none --no-warn-rwx-segments -T "$src_dir/link.ld" -o "$tmp/guest.elf" "$tmp/guest.o"
    mv -f "$tmp/guest.elf" "$out"
fi
echo "$out"
