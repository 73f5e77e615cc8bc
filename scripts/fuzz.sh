#!/usr/bin/env bash
# Builds the cargo-fuzz targets (fuzz/) and runs each briefly:
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 10)
# cargo-fuzz is installed into .cache/cargo-bin if missing. Runs on the stable toolchain
# with `--sanitizer none` (AddressSanitizer needs nightly); libFuzzer still finds panics,
# and Rust code is memory-safe without it. A finding is saved under fuzz/artifacts/ and fails
# the run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
secs=${1:-10}
root="${CARGO_INSTALL_ROOT:-$repo/.cache/cargo-bin}"
fuzz="$root/bin/cargo-fuzz"
log() { printf '[fuzz] %s\n' "$*" >&2; }
if ! [[ -x $fuzz ]]; then
    log "installing cargo-fuzz 0.13.2 into $root"
    cargo install --locked cargo-fuzz --version 0.13.2 --root "$root" >/dev/null
fi
cd fuzz
for t in config policy api_request agent_frame; do
    log "building $t"
    "$fuzz" build -s none "$t" >/dev/null
done
for t in config policy api_request agent_frame; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    # Seeds: the shipped example config and policies, and fuzz/seeds/<target>.
    case $t in
        config) seeds=(../examples) ;;
        policy) seeds=(../examples/policies) ;;
        *) seeds=() ; [[ -d seeds/$t ]] && seeds=("seeds/$t") ;;
    esac
    log "running $t for ${secs}s"
    "$fuzz" run -s none "$t" "$corpus" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 2
done
log "no crashes"
