#!/usr/bin/env bash
# 4-shot captioning throughput against OpenFlamingo's own evaluation on the
# same tiny model and synthetic COCO, one run. Extra flags go to bench-eval
# (--samples, --train, --threads).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-eval "$@"
