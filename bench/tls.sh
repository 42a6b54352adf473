#!/usr/bin/env bash
# Mutual TLS against plain text, one run each (release builds): the
# data-service stream (batches per second; extra flags go to it: --batches,
# --rounds, --threads, --batch-size), then the control plane (connections,
# launches, GetJob calls per second).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo bench -p flamingo-data-service --bench tls -- "$@"
cargo bench -p flamingo-coordinator --bench tls
