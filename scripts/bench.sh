#!/usr/bin/env bash
# Runs the anvil benchmark suite with its same-run raw baselines (docs/benchmarks.md).
#
#   scripts/bench.sh [--quick] [anvil-bench options...]     e.g. --json bench.json --clients 8
#
# Builds the release daemon and bench plus the static guest agent (scripts/build-agent.sh),
# then runs target/release/anvil-bench, which starts its own daemon on a temp socket, builds
# the busybox template and the Firecracker test guest into .cache/bench (cached), and prints
# every figure beside its baseline. Full suite: under 5 minutes; --quick: under 60 seconds
# (build time excluded once the binaries are built). Needs root (overlay mounts, cgroups).
# Env: CARGO_TARGET_DIR (default ./target), ANVIL_BENCH_BUILD_NICE (nice level of the build).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [[ $EUID -ne 0 ]]; then
    echo "bench.sh: needs root (overlay mounts, cgroups, Firecracker)" >&2
    exit 1
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
build_nice="${ANVIL_BENCH_BUILD_NICE:-0}"
echo "[bench] building release binaries in $CARGO_TARGET_DIR" >&2
nice -n "$build_nice" cargo build --release -q -p anvil -p anvil-bench >&2
agent="$(nice -n "$build_nice" scripts/build-agent.sh 2>/dev/null)"
echo "[bench] running anvil-bench $*" >&2
exec "$CARGO_TARGET_DIR/release/anvil-bench" \
    --anvil "$CARGO_TARGET_DIR/release/anvil" \
    --agent "$agent" \
    --repo "$repo" \
    "$@"
