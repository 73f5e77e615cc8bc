#!/usr/bin/env bash
# Sets everything up and runs the daemon in the foreground on examples/dev.toml:
# bubblewrap sandboxes, state and socket under ./.anvil/ (socket ./.anvil/api.sock).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
cargo build --release -p anvil
exec target/release/anvil daemon start --config examples/dev.toml
