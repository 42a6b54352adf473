#!/usr/bin/env bash
# Preprocessing throughput of the data service against OpenFlamingo's Python
# pipeline on the same shards, one run. Extra flags go to bench-data
# (--laion-samples, --mmc4-samples, --threads, --rounds); --replicas 1,2
# measures a job's throughput against the number of data-service replicas.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench -p flamingo-data-service --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-data "$@"
