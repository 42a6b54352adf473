#!/usr/bin/env bash
# Training-step throughput against the Python OpenFlamingo step on the same
# random weights and batch, one run. Extra flags go to bench-train-step
# (--sizes tiny,100m,neox — neox: a mid-size GPT-NeoX-family decoder at
# 224 px stepped on a LAION and an MMC4 batch —, --threads, --batch,
# --steps, --world N for FSDP against our full sharding, with and without
# checkpointing, --phases for where our step's time goes,
# --gradient-checkpointing, --strategy).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-train-step "$@"
