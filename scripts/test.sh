#!/usr/bin/env bash
# The whole test suite: unit and property tests, multi-process collective
# tests over real Gloo, and cluster tests against real etcd, coordinator and
# agent processes (fault tests included). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference

# A full run builds every test binary once; incremental caches would add a
# third to the target dir and save nothing on a clean checkout.
export CARGO_INCREMENTAL=0

echo "== build"
cargo build --workspace --bins --quiet
echo "== test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo ends on the last crate's doc-tests).
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "total: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
exit "$status"
