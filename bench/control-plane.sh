#!/usr/bin/env bash
# The control plane at scale: a real coordinator and etcd (mutual TLS on)
# against N simulated agents that speak the real protocol, each with its
# own node certificate and connection. For 64, 512 and 4,096 nodes × 8
# slots it prints the time to register, the cores steady heartbeats cost,
# the time to deliver a whole-cluster job's starts and to see it succeed,
# the time to re-place it after a node dies, metric-report throughput and
# cost, and etcd's size and write rate; at 4,096 nodes, each against its
# target. Extra flags go to bench-control-plane (--nodes 64,512,4096,
# --slots, --steady-seconds, --metrics-seconds, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --workspace --bins --quiet
exec "${CARGO_TARGET_DIR:-target}"/release/bench-control-plane "$@"
