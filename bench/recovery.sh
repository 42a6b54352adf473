#!/usr/bin/env bash
# Recovery after a rank's SIGKILL and effective training time under faults:
# flamingo's local cluster against torchrun --max-restarts running the
# Python OpenFlamingo step, same tiny model, one run. Takes about twice
# --minutes (default 10) plus set-up. Extra flags go to bench-recovery
# (--minutes, --fault-every, --kills, --batch, --checkpoint-steps,
# --skip-python, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release --workspace --bins --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-recovery "$@"
