#!/usr/bin/env bash
# Memory per rank of `flamingoctl train` on the ~130M-parameter random model
# of bench/model/reference.py, for 1, 2 and 4 ranks with shard_grad_op (and
# 1 with no_shard): trainable parameters, gradients, optimizer state, and
# each rank process's peak resident memory (VmHWM).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingoctl -p flamingo-worker --quiet
bin="$PWD/target/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$FLAMINGO_VENV/bin/python" "$OLDPWD/bench/model/reference.py" model 100m 1 >/dev/null
"$bin/flamingoctl" data synth --form laion --out data --samples 64 --per-shard 64 --image-size 112 >/dev/null 2>&1
printf '%-14s %6s %14s %14s %14s %14s\n' strategy ranks "params MiB" "grads MiB" "optim MiB" "peak RSS MiB"
for run in "no_shard 1" "shard_grad_op 1" "shard_grad_op 2" "shard_grad_op 4"; do
    set -- $run
    "$bin/flamingoctl" train --nproc "$2" --model model/model.toml --laion_shards data/laion-00000.tar \
        --batch_size_laion $((8 / $2)) --train_num_samples_laion 64 --max_steps 2 --warmup_steps 0 \
        --fsdp_sharding_strategy "$1" --run_name "$1-$2" >/dev/null 2>&1
    "$FLAMINGO_VENV/bin/python" - "runs/$1-$2" <<'PY'
import glob, json, sys
ranks = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/memory-rank-*.json")]
mib = lambda key: max(r[key] for r in ranks) / 2**20
r = ranks[0]
print(f"{r['strategy']:<14} {r['world_size']:>6} {mib('parameter_bytes'):>14.1f} {mib('gradient_bytes'):>14.1f} "
      f"{mib('optimizer_bytes'):>14.1f} {mib('peak_rss_bytes'):>14.1f}")
PY
done
