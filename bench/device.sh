#!/usr/bin/env bash
# The GPU checks, as one prepared run on a lent GPU machine (torch 2.11.0 +
# CUDA at /opt/torch/.venv, no Rust toolchain, no network). Build here with
# `bench/device.sh --prepare`, which puts the stripped binaries, the
# libraries they need and the Python packages of the baseline under
# target/device/; the run carries that folder and calls this script
# without arguments. Results go to $OUT (the device tool's output folder):
#   gpu.txt           nvidia-smi
#   check.txt         bench-gpu-step check: the GPU training step vs the CPU
#   inference.txt     flamingoctl score/generate on cuda vs cpu
#   mfu-ours.json     bench-gpu-step mfu on the 3B-shaped model
#   mfu-python.json   the Python OpenFlamingo step on the same shapes
# Each part has a time limit inside an overall budget (BUDGET seconds).
# PARTS picks parts (default "check inference mfu-ours mfu-python");
# CHECKPOINTING is mfu-ours' setting (default "true,false"); RECOMPUTE, when
# set (say "full,selective,none"), measures those recompute policies instead;
# COPIES is mfu-ours' --bf16-weight-copies (default "true"; "true,false"
# also measures autocast casting the weights at every use); CUDA_GRAPHS=1
# runs mfu-ours through CUDA graphs (with CHECKPOINTING=false); SHAPE=9b
# measures both sides on the OpenFlamingo-9B shape, at BATCHES (default
# "8,32"; the largest that fits for 9b).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    source scripts/setup.sh
    flamingo_setup_reference
    cargo build --release -p flamingo-bench -p flamingoctl --quiet
    rm -rf target/device && mkdir -p target/device/lib target/device/fallback
    release=${CARGO_TARGET_DIR:-target}/release
    cp "$release/bench-gpu-step" "$release/flamingoctl" target/device/
    # bench-gpu-step again with the shim's CUDA parts (CUDA graphs, the
    # allocator's counters), in a target folder of its own.
    FLAMINGO_CUDA=1 flamingo_setup
    CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda} cargo build --release -p flamingo-bench \
        --features cuda --bin bench-gpu-step --quiet
    cp "${CUDA_TARGET_DIR:-target/cuda}/release/bench-gpu-step" target/device/bench-gpu-step-cuda
    strip target/device/bench-gpu-step target/device/bench-gpu-step-cuda target/device/flamingoctl
    cp -L /lib/x86_64-linux-gnu/libjpeg.so.62 target/device/lib/
    cp -L /lib/x86_64-linux-gnu/libstdc++.so.6 target/device/fallback/
    # The baseline's packages: pure Python from our venv, compiled ones as
    # wheels for the device's Python (3.12 on the machines seen so far).
    site="$FLAMINGO_VENV/lib/python3.11/site-packages"
    device_python=${DEVICE_PYTHON:-3.12}
    wheels=$(mktemp -d)
    "$FLAMINGO_VENV/bin/python" -m pip download -q --disable-pip-version-check --only-binary=:all: \
        --python-version "$device_python" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --no-deps -d "$wheels" \
        "pillow==$("$FLAMINGO_VENV/bin/python" -c 'import PIL; print(PIL.__version__)')" \
        "regex==$("$FLAMINGO_VENV/bin/python" -c 'import regex; print(regex.__version__)')" \
        torchvision==0.26.0 pyyaml "numpy==$("$FLAMINGO_VENV/bin/python" -c 'import numpy; print(numpy.__version__)')"
    staging=$(mktemp -d)
    mkdir -p "$staging/deps" "$staging/fallback"
    other_models=$(cd "$site/transformers/models" && ls | grep -v -x -E "auto|mpt|__init__.py|clip|encoder_decoder|gpt_neox|llama" | sed 's|^|--exclude=transformers/models/|')
    packages="transformers open_clip open_flamingo einops einops_exts huggingface_hub tokenizers safetensors ftfy wcwidth packaging filelock fsspec tqdm requests certifi charset_normalizer idna urllib3 typing_extensions.py"
    dists=$(cd "$site" && ls -d *.dist-info | grep -i -E "^(transformers|open_clip|open_flamingo|einops|huggingface_hub|tokenizers|safetensors|ftfy|wcwidth|packaging|filelock|fsspec|tqdm|requests|certifi|charset_normalizer|idna|urllib3|typing_extensions)[-_]")
    # shellcheck disable=SC2086
    (cd "$site" && tar cf - --exclude=__pycache__ $other_models $packages $dists) | tar xf - -C "$staging/deps"
    for wheel in "$wheels"/*.whl; do
        case "$(basename "$wheel")" in
            numpy-*) "$FLAMINGO_VENV/bin/python" -m zipfile -e "$wheel" "$staging/fallback" ;;
            *) "$FLAMINGO_VENV/bin/python" -m zipfile -e "$wheel" "$staging/deps" ;;
        esac
    done
    tar cJf target/device/pydeps.tar.xz -C "$staging/deps" .
    tar cJf target/device/pyfallback.tar.xz -C "$staging/fallback" --exclude=tests .
    rm -rf "$wheels" "$staging"
    du -sh target/device
    exit 0
fi

OUT=${OUT:-/tmp/flamingo-device-out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-500}
started=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - started))); }
PARTS=${PARTS:-check inference mfu-ours mfu-python}
CHECKPOINTING=${CHECKPOINTING:-true,false}
part() { # part NAME LIMIT COMMAND...: runs with min(LIMIT, time left)
    local name=$1 limit=$2; shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    local budget; budget=$(left)
    (( budget < limit )) && limit=$budget
    if (( limit < 20 )); then echo "SKIPPED $name: out of time" | tee -a "$OUT/summary.txt"; return; fi
    local t0; t0=$(date +%s)
    timeout "$limit" "$@"
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}

PY=${PY:-/opt/torch/.venv/bin/python}
[[ -x $PY ]] || PY=python3
TORCH_LIB=$($PY -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
BIN=$PWD/target/device
export PY BIN OUT
export LD_LIBRARY_PATH="$TORCH_LIB:$BIN/lib:$BIN/fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The CUDA build of bench-gpu-step when all its libraries resolve here
# (CUDA graphs need it), else the plain one.
STEP=$BIN/bench-gpu-step
if [[ -x $BIN/bench-gpu-step-cuda ]] && ! ldd "$BIN/bench-gpu-step-cuda" | grep -q "not found"; then
    STEP=$BIN/bench-gpu-step-cuda
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import sys, torch; print(sys.version); print(torch.__version__, torch.cuda.is_available())"; ldd "$STEP" | grep -i "not found"; echo "step binary: $STEP"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

part check 150 "$STEP" check > "$OUT/check.txt" 2>&1
tail -5 "$OUT/check.txt"

inference() {
    local dir; dir=$(mktemp -d)
    "$BIN/flamingoctl" data synth --form laion --out "$dir/data" --samples 4 --per-shard 4 --image-size 32 >/dev/null 2>&1
    "$BIN/flamingoctl" tiny-model --tokenizer "$dir/data/tokenizer" --out "$dir/tiny" >/dev/null
    "$PY" - "$dir" <<'PY'
import io, sys, tarfile, pathlib
d = pathlib.Path(sys.argv[1])
with tarfile.open(d / "data" / "laion-00000.tar") as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg")))
    (d / ("held" + pathlib.Path(member.name).suffix)).write_bytes(tar.extractfile(member).read())
PY
    local image; image=$(ls "$dir"/held.*)
    for device in cpu "cuda --dtype fp32" "cuda --dtype bf16"; do
        echo "== score --device $device"
        # shellcheck disable=SC2086
        "$BIN/flamingoctl" score --model "$dir/tiny/model.toml" --image "$image" --prompt "<image>a small red circle" --json --device $device
        echo "== generate --device $device"
        # shellcheck disable=SC2086
        "$BIN/flamingoctl" generate --model "$dir/tiny/model.toml" --image "$image" --prompt "<image>a" --max-new-tokens 8 --json --device $device
    done
}
export -f inference
part inference 60 bash -c inference > "$OUT/inference.txt" 2>&1
tail -4 "$OUT/inference.txt"

part mfu-ours 240 "$STEP" mfu --shape "${SHAPE:-3b}" --batch "${BATCHES:-8,32}" --tokens 256 --images 4 --steps 3 --checkpointing "$CHECKPOINTING" ${RECOMPUTE:+--recompute-policy "$RECOMPUTE"} --bf16-weight-copies "${COPIES:-true}" ${CUDA_GRAPHS:+--cuda-graphs} --work /tmp/flamingo-mfu > "$OUT/mfu-ours.json" 2> "$OUT/mfu-ours.log"
rm -rf /tmp/flamingo-mfu
cat "$OUT/mfu-ours.json"

python_baseline() {
    mkdir -p /tmp/pydeps /tmp/pyfallback
    tar xJf "$BIN/pydeps.tar.xz" -C /tmp/pydeps
    tar xJf "$BIN/pyfallback.tar.xz" -C /tmp/pyfallback
    # The device's own numpy first, ours only if it has none.
    PYTHONPATH=/tmp/pydeps "$PY" -c "import numpy" 2>/dev/null || export FALLBACK=/tmp/pyfallback
    PYTHONPATH="/tmp/pydeps${FALLBACK:+:$FALLBACK}" "$PY" bench/gpu_step/reference.py "${BATCHES:-8,32}" 256 4 3 24 "${SHAPE:-3b}"
}
export SHAPE BATCHES
export -f python_baseline
part mfu-python 200 bash -c python_baseline > "$OUT/mfu-python.json" 2> "$OUT/mfu-python.log"
cat "$OUT/mfu-python.json"
cat "$OUT/summary.txt"
