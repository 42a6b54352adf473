#!/usr/bin/env bash
# Our Gloo collectives vs torch.distributed's gloo backend, same torch, same
# sizes, same ranks, one run. Extra flags go to bench-collectives (--ranks,
# --sizes, --ops, --rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release -p flamingo-bench --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-collectives "$@"
