#!/usr/bin/env bash
# Memory per rank of `flamingoctl train` on the ~130M-parameter random model
# of bench/model/reference.py, for 1, 2 and 4 ranks with full and with
# shard_grad_op (and 1 with no_shard): what each rank holds between steps —
# trainable parameters, gradients, optimizer state, frozen weights — the most
# gathered (whole) unit bytes alive at once under full, and each rank
# process's peak resident memory (VmHWM) while loading the model and,
# apart, during the steps (the peak restarted after loading); full at 2
# and 4 ranks also with --gradient_checkpointing. Last, full at 2 and 4
# ranks on the same model converted to safetensors (`flamingoctl model
# convert`), which each rank reads by byte range, only the shards it keeps
# (the rows marked "st"; the pickles above are read whole by every rank).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
flamingo_setup_reference
cargo build --release -p flamingoctl -p flamingo-worker --quiet
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
"$FLAMINGO_VENV/bin/python" "$OLDPWD/bench/model/reference.py" model 100m 1 >/dev/null
"$bin/flamingoctl" data synth --form laion --out data --samples 64 --per-shard 64 --image-size 112 >/dev/null 2>&1
mkdir model-st
cp -r model/lm model/clip.json model-st/
"$bin/flamingoctl" model convert model/clip.bin --out model-st/clip.safetensors >/dev/null
"$bin/flamingoctl" model convert model/checkpoint.pt --out model-st/checkpoint.safetensors >/dev/null
sed -e 's/clip\.bin/clip.safetensors/' -e 's/checkpoint\.pt/checkpoint.safetensors/' model/model.toml > model-st/model.toml
printf '%-14s %6s %8s %11s %11s %11s %11s %11s %11s %13s %13s %13s %7s\n' strategy ranks ckpt "params MiB" "grads MiB" "optim MiB" "sum MiB" \
    "frozen MiB" "gather MiB" "load RSS MiB" "step RSS MiB" "load read MiB" "load s"
for run in "no_shard 1" "shard_grad_op 1" "shard_grad_op 2" "shard_grad_op 4" "full 1" "full 2" "full 4" "full 2 ckpt" "full 4 ckpt" "full 2 st" "full 4 st"; do
    set -- $run
    ckpt=()
    [[ "${3:-}" == ckpt ]] && ckpt=(--gradient_checkpointing)
    spec=model/model.toml
    [[ "${3:-}" == st ]] && spec=model-st/model.toml
    "$bin/flamingoctl" train --nproc "$2" --model "$spec" --laion_shards data/laion-00000.tar \
        --batch_size_laion $((8 / $2)) --train_num_samples_laion 64 --max_steps 2 --warmup_steps 0 \
        --fsdp_sharding_strategy "$1" "${ckpt[@]}" --run_name "$1-$2${3:+-$3}" >/dev/null 2>&1
    "$FLAMINGO_VENV/bin/python" - "runs/$1-$2${3:+-$3}" "${3:-}" <<'PY'
import glob, json, sys
ranks = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/memory-rank-*.json")]
mib = lambda key: max(r[key] for r in ranks) / 2**20
r = ranks[0]
total = max(r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"] for r in ranks) / 2**20
ckpt = "on" if r["gradient_checkpointing"] else "off"
if sys.argv[2] == "st":
    ckpt += " st"
print(f"{r['strategy']:<14} {r['world_size']:>6} {ckpt:>8} {mib('parameter_bytes'):>11.1f} {mib('gradient_bytes'):>11.1f} "
      f"{mib('optimizer_bytes'):>11.1f} {total:>11.1f} {mib('frozen_bytes'):>11.1f} {mib('gathered_peak_bytes'):>11.1f} "
      f"{mib('load_peak_rss_bytes'):>13.1f} {mib('step_peak_rss_bytes'):>13.1f} {mib('load_read_bytes'):>13.1f} "
      f"{max(r['load_seconds'] for r in ranks):>7.2f}")
PY
done
