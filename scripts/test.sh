#!/usr/bin/env bash
# Runs the whole test suite (after scripts/setup.sh has installed what the tests need).
# Tests that need something this machine lacks print "SKIP: <reason>".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
# The daemon tests find the static agent here.
export ANVIL_AGENT_BIN="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/anvil-agent"
# Tests start real sandboxes and daemons; two at a time suits a 2-core host.
cargo test --workspace --no-fail-fast -- --test-threads="${ANVIL_TEST_THREADS:-2}" "$@"
