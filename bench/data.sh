#!/usr/bin/env bash
# Preprocessing throughput of the data service against OpenFlamingo's Python
# pipeline on the same shards, one run. Extra flags go to bench-data
# (--laion-samples, --mmc4-samples, --threads, --rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-data "$@"
