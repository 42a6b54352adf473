#!/usr/bin/env bash
# Training-step throughput against the Python OpenFlamingo step on the same
# random weights and batch, one run. Extra flags go to bench-train-step
# (--sizes, --threads, --batch, --steps, --world N for FSDP against our
# full sharding, with and without checkpointing, --gradient-checkpointing,
# --strategy).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-train-step "$@"
