#!/usr/bin/env bash
# The main job: builds flamingo, brings up a local cluster (etcd, coordinator,
# a data-service replica per node, 2 agents × 2 slots), checks the
# collectives on all 4 ranks,
# then trains a tiny Flamingo on the synthetic shapes dataset (LAION and MMC4
# forms) as a cluster job, checkpointing as it goes, and captions images it
# never saw with the trained weights, and scores untrained and trained
# weights on a synthetic few-shot captioning benchmark (flamingoctl eval).
# Takes the cluster down at the end.
#   FLAMINGO_DEMO_EPOCHS      training epochs (default 10; ~3-4 CPU minutes)
#   FLAMINGO_DEMO_MAX_BYTES   largest message of the collective sweep (default 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "== build"
cargo build --workspace --bins --quiet
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/debug
ctl() { "$bin/flamingoctl" "$@"; }

export FLAMINGO_STATE_DIR=${FLAMINGO_STATE_DIR:-$PWD/.flamingo/demo}
work=$FLAMINGO_STATE_DIR/work
ctl down >/dev/null 2>&1 || true
trap 'ctl down >/dev/null 2>&1 || true' EXIT

# The evaluation at the end runs as a command job (`launch --job eval`):
# this cluster allows them, for its admin (the user who ran `up`).
echo "== flamingoctl up --nodes 2 --slots-per-node 2 --allow-command-jobs"
ctl up --nodes 2 --slots-per-node 2 --allow-command-jobs
ctl nodes

echo "== flamingoctl launch --nodes 2 --slots-per-node 2 --job collective-check --wait"
ctl launch --nodes 2 --slots-per-node 2 --job collective-check \
    --max-bytes "${FLAMINGO_DEMO_MAX_BYTES:-67108864}" --wait

echo "== synthetic shapes data and a tiny random Flamingo in $work"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
ctl data synth --form laion --out data --samples 2048 --per-shard 512 --image-size 32 >/dev/null
ctl data synth --form mmc4 --out data --samples 256 --per-shard 128 --image-size 96 >/dev/null
ctl tiny-model --tokenizer data/tokenizer --out tiny --lm-width 64 --vision-width 64 >/dev/null
ls data

# The verdicts let each node's data-service replica plan every batch and
# prepare only its own ranks' slices (the specs match what the job's flags
# and model give: the LM's tokenizer, the model's 32 px images).
echo "== flamingoctl data index --accept (LAION, MMC4)"
for form in laion mmc4; do
    count=$([[ $form == laion ]] && echo 00003 || echo 00001)
    printf 'dataset = "%s"\nshards = "data/%s-{00000..%s}.tar"\ntokenizer = "tiny/lm"\nimage_size = 32\n' \
        "$form" "$form" "$count" > "$form.toml"
    ctl data index --accept "$form.toml" 2>/dev/null
done

echo "== flamingoctl launch --nodes 2 --slots-per-node 2 (train) --wait --follow"
job=$(ctl launch --nodes 2 --slots-per-node 2 --name demo \
    --model tiny/model.toml \
    --laion_shards 'data/laion-{00000..00003}.tar' \
    --mmc4_shards 'data/mmc4-{00000..00001}.tar' \
    --batch_size_laion 8 --batch_size_mmc4 1 \
    --train_num_samples_laion 2048 --train_num_samples_mmc4 256 \
    --num_epochs "${FLAMINGO_DEMO_EPOCHS:-10}" \
    --learning_rate 2e-3 --lr_scheduler cosine --warmup_steps 20 \
    --logging_steps 16 --checkpoint_steps 100 --runs_dir runs)
echo "launched $job"
ctl wait "$job" --follow
for log in "$FLAMINGO_STATE_DIR"/logs/data-service-node-*.log; do
    if grep -a "dataset opened" "$log" | grep -aq "planned.*true"; then
        echo "$(basename "$log" .log): planned batches, prepared only its node's slices"
    else
        echo "$(basename "$log" .log): WARNING: no planned batches (verdicts not used)"
    fi
done


echo "== flamingoctl checkpoints $job"
ctl checkpoints "$job"

echo "== flamingoctl export $job --out trained.pt"
ctl export "$job" --out trained.pt
cat > trained.toml <<EOF
[vision]
arch = "tiny/clip.json"
weights = "tiny/clip.safetensors"
[language]
path = "tiny/lm"
[flamingo]
checkpoint = "trained.pt"
EOF

echo "== flamingoctl generate on scenes the model never saw (seed 99)"
ctl data synth --form laion --out heldout --samples 4 --per-shard 4 --image-size 32 --seed 99 >/dev/null
tar -xf heldout/laion-00000.tar -C heldout
for text in heldout/*.txt; do
    image=${text%.txt}.png
    caption=$(ctl generate --model trained.toml --image "$image" --prompt '<image>' --max-new-tokens 12)
    printf '%-28s truth: %-40s generated: %s\n' "$(basename "$image")" "$(cat "$text")" "$caption"
done

echo "== flamingoctl eval --job $job: few-shot captioning on a synthetic COCO (Karpathy layout), untrained vs trained"
ctl data synth-eval --dataset coco --out coco --train 64 --test 32 >/dev/null
ctl eval --model tiny/model.toml --dataset coco --data-dir coco --shots 0 4 --results untrained.json
ctl launch --nodes 1 --slots-per-node 2 --job eval --wait -- \
    --job "$job" --dataset coco --data-dir coco --shots 0 4 --results trained.json >/dev/null
echo "trained (2 ranks, job $job's latest checkpoint):"
cat trained.json
echo "stored with job $job (its dashboard page charts them next to the loss):"
ctl evals "$job"

echo "== flamingoctl down"
cd - >/dev/null
trap - EXIT
ctl down
