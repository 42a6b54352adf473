#!/usr/bin/env bash
# The whole test suite: unit and property tests, multi-process collective
# tests over real Gloo, and cluster tests against real etcd, coordinator and
# agent processes (fault tests included). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "== build"
cargo build --workspace --bins --quiet
echo "== test"
cargo test --workspace --no-fail-fast
