#!/usr/bin/env bash
# Installs what flamingo needs and sets up the build environment. Source it
# (`source scripts/setup.sh`) or let scripts/demo.sh and scripts/test.sh do it.
# Idempotent and quiet when nothing is to do:
#   - Debian packages: etcd-server, protobuf-compiler, libgloo-dev, build tools
#     (installed when run as root, otherwise listed with the command to run);
#   - a virtual environment with torch==2.11.0, reused from
#     $FLAMINGO_VENV (default ~/.cache/flamingo/venv-torch-2.11.0) when present;
#   - exports what cargo needs to build tch and the c10d shim against it.

# Installs the Debian packages given that are missing (as root; otherwise
# says what to run). $1 names what they are for.
flamingo_apt_install() {
    local purpose=$1
    shift
    local missing=()
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages$purpose: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || { echo "setup: apt-get install ${missing[*]} failed" >&2; return 1; }
    else
        echo "setup: missing Debian packages$purpose: ${missing[*]}" >&2
        echo "setup: run: sudo apt-get install -y ${missing[*]}" >&2
        return 1
    fi
}

flamingo_setup() {
    local torch_version=2.11.0
    flamingo_apt_install "" etcd-server protobuf-compiler libgloo-dev g++ pkg-config \
        python3-venv libjpeg62-turbo-dev || return 1
    # etcd-server's unit starts a system etcd on :2379; flamingo runs its own
    # on free ports, so the system one is not needed (and not touched).

    local python=${FLAMINGO_PYTHON:-python3}
    local venv=${FLAMINGO_VENV:-$HOME/.cache/flamingo/venv-torch-$torch_version}
    if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
        echo "setup: creating $venv with torch==$torch_version (a few GiB, once)"
        if [ ! -x "$venv/bin/python" ]; then
            if ! "$python" -m venv "$venv" 2>/dev/null; then
                # Debian's python3 without ensurepip: build the venv without pip.
                "$python" -m venv --without-pip "$venv" || return 1
                "$python" -m pip --python "$venv/bin/python" --version >/dev/null 2>&1 || return 1
            fi
        fi
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$torch_version" \
            || { echo "setup: pip install torch==$torch_version into $venv failed" >&2; return 1; }
    fi

    # The `cuda` cargo feature (ProcessGroupNCCL) compiles against CUDA's
    # headers; the torch wheel ships the runtime's but not crt/ and nv/.
    if [ "${FLAMINGO_CUDA:-0}" = 1 ] && [ ! -e "$venv/lib/python"*/site-packages/nvidia/cu13/include/crt/host_config.h ]; then
        echo "setup: adding CUDA headers for the cuda feature (nvidia-cuda-crt, nvidia-cuda-cccl)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
            || { echo "setup: pip install of the CUDA headers failed" >&2; return 1; }
    fi

    export FLAMINGO_VENV=$venv
    export VIRTUAL_ENV=$venv
    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
    # tch/torch-sys find libtorch through the venv's python; the binaries get
    # an rpath to torch's lib/ so they run without LD_LIBRARY_PATH.
    export LIBTORCH_USE_PYTORCH=1
    # Keep libtorch's own thread pools small: ranks share few cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if ! command -v cargo >/dev/null 2>&1; then
        [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust with rustup" >&2; return 1; }
    return 0
}

# Python packages the parity tests compare against (tests only): the Python
# OpenFlamingo and open_clip themselves, installed with --no-deps (they pin
# an old torch; torchvision is the release that matches torch 2.11.0), what
# their modules import, and Hugging Face transformers for the decoders.
# Idempotent.
flamingo_setup_reference() {
    local python="$FLAMINGO_VENV/bin/python"
    # The dashboard's browser test drives Debian's Chromium through
    # chromedriver.
    flamingo_apt_install " for the browser test" chromium chromium-driver || return 1
    # The Slurm test runs a real cluster (munged, slurmctld, two slurmd) that
    # it starts and stops itself; the packages' own services are not used.
    flamingo_apt_install " for the Slurm test" slurm-wlm munge || return 1
    # pycocoevalcap's tokenizer (the CIDEr reference) is Stanford's, in Java.
    flamingo_apt_install " for the CIDEr reference" default-jre-headless || return 1
    # OK-VQA's stemming reads WordNet 3.0; NLTK's reader (the reference)
    # also wants the sense index.
    flamingo_apt_install " for OK-VQA's stemming" wordnet-base wordnet-sense-index || return 1
    # The crash-consistency test reads the checkpoint writer's fsyncs and
    # renames through strace.
    flamingo_apt_install " for the crash-consistency test" strace || return 1
    # The network-namespace tests: namespaces and a bridge (iproute2),
    # partitions (nftables).
    flamingo_apt_install " for the network-namespace tests" iproute2 nftables || return 1
    if "$python" -c "import einops, einops_exts, safetensors, open_clip, transformers, webdataset, braceexpand, moto, flask_cors, tensorboard, kubernetes_validate, sklearn, pycocoevalcap, nltk, inflection, importlib.util, importlib.metadata as m, sys; sys.exit(0 if importlib.util.find_spec('open_flamingo') and m.version('webdataset') == '0.2.86' else 1)" 2>/dev/null; then
        return 0
    fi
    echo "setup: installing the Python reference packages for the parity tests"
    # pip warns that the --no-deps packages' pins (torch 2.0.1, …) are unmet;
    # that is intended, so its output is shown only when it fails.
    local log
    log=$(mktemp)
    if ! { "$python" -m pip install -q --disable-pip-version-check --no-deps \
            "open-flamingo==2.0.1" "open_clip_torch==2.24.0" "torchvision==0.26.0" \
        && "$python" -m pip install -q --disable-pip-version-check \
            "einops==0.8.2" "einops-exts==0.0.4" "safetensors==0.8.0" \
            "ftfy==6.3.1" "regex==2026.11.19" "tqdm==4.70.1" "pillow==13.0.0" \
            "transformers==4.57.1" "webdataset==0.2.86" "braceexpand==0.1.7" \
            "moto[server]==5.2.5" "tensorboard==2.21.0" "kubernetes-validate==1.34.1" \
            "scikit-learn==1.9.1" "pycocoevalcap==1.2" "nltk==3.10.4" "inflection==0.5.1"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: pip install of the reference packages failed" >&2
        return 1
    fi
    rm -f "$log"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    flamingo_setup
    echo "setup: ok (venv $FLAMINGO_VENV)"
else
    flamingo_setup
fi
