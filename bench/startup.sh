#!/usr/bin/env bash
# Start-up of a sharded training job per rank — peak RSS (VmHWM), bytes read
# while loading, seconds from process start to the first finished step, the
# first steps' losses — on an OpenFlamingo-shaped random model of about 1.1B
# parameters (CLIP ViT-L/14 + a 24 × 1536 MPT-shaped decoder) at 1, 2 and 4
# ranks: the Python OpenFlamingo under torch FSDP, our path reading every
# weight, and ours reading only each rank's shards, in one run. Then the
# OpenFlamingo-3B shape loaded by shards at 4 ranks and one forward pass.
# Extra flags go to bench-startup (--size, --worlds, --batch, --steps,
# --threads, --forward SIZE, --forward-world, --keep DIR to reuse the
# model files between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-startup --forward 3b --forward-whole "$@"
