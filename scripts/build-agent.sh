#!/usr/bin/env bash
# Builds the static guest agent and prints the binary's path.
# The explicit --target keeps build scripts and proc-macros dynamic while the agent itself
# links statically (crt-static). Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target "$target" -p anvil-agent >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/$target/release/anvil-agent"
if ! ldd "$bin" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
    echo "error: $bin is dynamically linked" >&2
    exit 1
fi
echo "$bin"
