#!/usr/bin/env bash
# The main job: builds flamingo, brings up a local cluster (etcd, coordinator,
# 2 agents × 2 slots), runs collective-check on all 4 ranks, prints the
# bandwidth table and takes the cluster down again.
#   FLAMINGO_DEMO_MAX_BYTES   largest message of the sweep (default 256 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "== build"
cargo build --workspace --bins --quiet
bin=$PWD/target/debug

export FLAMINGO_STATE_DIR=${FLAMINGO_STATE_DIR:-$PWD/.flamingo/demo}
"$bin/flamingoctl" down >/dev/null 2>&1 || true
trap '"$bin/flamingoctl" down >/dev/null 2>&1 || true' EXIT

echo "== flamingoctl up --nodes 2 --slots-per-node 2"
"$bin/flamingoctl" up --nodes 2 --slots-per-node 2
"$bin/flamingoctl" nodes

echo "== flamingoctl launch --nodes 2 --slots-per-node 2 --job collective-check --wait --follow"
"$bin/flamingoctl" launch --nodes 2 --slots-per-node 2 --job collective-check \
    --max-bytes "${FLAMINGO_DEMO_MAX_BYTES:-268435456}" --wait --follow

echo "== flamingoctl down"
trap - EXIT
"$bin/flamingoctl" down
