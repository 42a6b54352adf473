#!/usr/bin/env bash
# Data-service batches per second over mutual TLS against plain text, one
# run (release build). Extra flags go to the bench (--batches, --rounds,
# --threads, --batch-size).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
exec cargo bench -p flamingo-data-service --bench tls -- "$@"
