#!/usr/bin/env bash
# Soak: a local cluster (`flamingoctl up`, mutual TLS on, 2 nodes × 2
# slots) runs JOBS short training jobs (default 200), each with a metric
# report and a checkpoint every few steps, in waves of 25, with finished
# jobs leaving etcd after RETENTION seconds (default 20). After each wave
# it prints etcd's database file, the coordinator's resident memory and open
# files, and the jobs etcd still holds; at the end, once the last wave's
# retention has passed, a summary compares the last figures with those
# after the first wave: flat means bounded.
#
#   ./bench/soak.sh [JOBS] [RETENTION]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup
cargo build --release --workspace --bins --quiet
bin=$PWD/${CARGO_TARGET_DIR:-target}/release
jobs=${1:-200}
retention=${2:-20}
wave=25

root=$(mktemp -d)
export FLAMINGO_STATE_DIR=$root/cluster
export FLAMINGO_BIN_DIR=$bin
export FLAMINGO_JOB_RETENTION_SECONDS=$retention
ctl() { "$bin/flamingoctl" "$@"; }
trap 'ctl down >/dev/null 2>&1 || true; rm -rf "$root"' EXIT

ctl up --nodes 2 --slots-per-node 2 >/dev/null 2>&1
# The local data service reads the cluster's work folder.
mkdir -p "$FLAMINGO_STATE_DIR/work"
cd "$FLAMINGO_STATE_DIR/work"
ctl data synth --form laion --out data --samples 64 --per-shard 32 --image-size 32 >/dev/null
ctl tiny-model --tokenizer data/tokenizer --out tiny --lm-width 64 --vision-width 64 >/dev/null

coordinator=$(pgrep -f "flamingo-coordinator.*$FLAMINGO_STATE_DIR" | head -1)
db=$FLAMINGO_STATE_DIR/etcd/member/snap/db
measure() {
    local rss fds size live
    rss=$(awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$coordinator/status")
    fds=$(ls "/proc/$coordinator/fd" | wc -l)
    size=$(stat -c %s "$db" | awk '{ printf "%.2f", $1 / 1048576 }')
    live=$(ctl --json list | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
    echo "$size $rss $fds $live"
}

echo "soak: $jobs jobs in waves of $wave, retention ${retention}s, coordinator pid $coordinator"
printf '%8s %12s %16s %12s %14s %8s\n' jobs "etcd db MiB" "coordinator MiB" "open files" "jobs in etcd" elapsed
started=$SECONDS
first=""
done_jobs=0
while [ "$done_jobs" -lt "$jobs" ]; do
    ids=()
    for _ in $(seq 1 $wave); do
        [ "$done_jobs" -ge "$jobs" ] && break
        done_jobs=$((done_jobs + 1))
        ids+=("$(ctl launch --nodes 1 --slots-per-node 1 --name "soak-$done_jobs" \
            --model tiny/model.toml --laion_shards 'data/laion-{00000..00001}.tar' \
            --batch_size_laion 4 --train_num_samples_laion 32 --num_epochs 1 \
            --logging_steps 1 --checkpoint_steps 2 --runs_dir runs)")
    done
    for id in "${ids[@]}"; do
        state=$(ctl --json wait "$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])' || true)
        [ "$state" = Succeeded ] || { echo "soak: job $id ended $state" >&2; ctl status "$id" >&2; exit 1; }
    done
    # One retention period (and a tick) after the wave ended.
    sleep $((retention + 3))
    read -r size rss fds live < <(measure)
    [ -z "$first" ] && first="$size $rss $fds"
    printf '%8d %12s %16s %12s %14s %7ds\n' "$done_jobs" "$size" "$rss" "$fds" "$live" $((SECONDS - started))
done
read -r size0 rss0 fds0 <<<"$first"
python3 - "$size0" "$rss0" "$fds0" "$size" "$rss" "$fds" "$live" "$jobs" <<'EOF'
import sys
size0, rss0, fds0, size, rss, fds = map(float, sys.argv[1:7])
live, jobs = int(sys.argv[7]), int(sys.argv[8])
print(f"summary: {jobs} jobs; after the last retention etcd holds {live} job(s); "
      f"etcd db {size:.2f} MiB ({size / size0:.2f}x the first wave's), "
      f"coordinator RSS {rss:.1f} MiB ({rss / rss0:.2f}x), open files {fds:.0f} ({fds / fds0:.2f}x)")
EOF
