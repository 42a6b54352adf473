#!/usr/bin/env bash
# Flamingo forward/generate throughput against the Python OpenFlamingo on the
# same random weights, one run. Extra flags go to bench-model (--sizes, --threads).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-model "$@"
