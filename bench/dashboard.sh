#!/usr/bin/env bash
# The coordinator's metrics path under load: 64 simulated ranks reporting
# every 100 ms for 5 minutes on top of 1M stored reports, while simulated
# dashboards refresh; prints the data API's p99 against the idle baseline
# (same run) and the 200 ms target, and the coordinator's CPU and memory.
# Extra flags go to bench-dashboard (--ranks, --interval-ms, --seconds,
# --prefill, --viewers, --refresh-ms, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --workspace --bins --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-dashboard "$@"
