#!/usr/bin/env bash
# The GPU check: one command, under 10 minutes on one GPU, ending in one markdown table for the README.
# What it runs and why: docs/gpu.md. The stages themselves are in scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh --fetch-wheels   # where there is network: fill scripts/gpu_wheels/
#   bash scripts/gpu_check.sh                  # on the GPU machine (no network needed): install, check, table
#   bash scripts/gpu_check.sh --install-only   # only install llmtrain + the wheels (no GPU needed)
#
# The GPU machine is expected to have torch, triton, transformers, tokenizers, numpy, pyyaml and
# tqdm; hydra-core, omegaconf, antlr4, setuptools (to build llmtrain) and, for the reference rows of
# the optimizer bench, bitsandbytes and lion-pytorch come from scripts/gpu_wheels/ (pip --no-index).
#
# Environment: PYTHON (default python3: the one with torch), GPU_CHECK_OUT (results, default
# outputs/gpu_check/<date-time>), GPU_CHECK_BUDGET_S (default 570: the stages stop there),
# GPU_CHECK_WHEELS (default scripts/gpu_wheels).
# Exit: 0 all checks passed; 1 a check failed, or no GPU was found; 2 bad usage or no wheels.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/scripts/gpu_wheels}
STAGES=$REPO/scripts/gpu_check.py
BUDGET=${GPU_CHECK_BUDGET_S:-570}
# Pinned: the versions the test suite runs with. antlr4 4.9.3 has only an sdist: it is built into a wheel.
BINARY_WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 setuptools==84.2.1 lion-pytorch==0.2.5 bitsandbytes==0.50.2)
SOURCE_WHEELS=(antlr4-python3-runtime==4.9.3)

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

fetch_wheels() {
    mkdir -p "$WHEELS"
    # The GPU machine: Linux x86-64, CPython 3.12 (bitsandbytes is the only platform wheel, py3-none).
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${BINARY_WHEELS[@]}" || return 2
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "${SOURCE_WHEELS[@]}" || return 2
    echo "wheels in $WHEELS:" && ls -1 "$WHEELS"
}

# Install into a folder of its own (--target): the machine's own packages are left as they are.
install() {
    local site=$1
    if "$PY" -c 'import hydra, omegaconf' 2>/dev/null && [ -z "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
        echo "hydra-core and omegaconf are already installed: no wheels needed" >&2
    else
        if [ -z "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
            echo "error: $WHEELS has no wheels; run 'bash scripts/gpu_check.sh --fetch-wheels' where" \
                 "there is network and bring that folder along" >&2
            return 2
        fi
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$WHEELS"/*.whl || return 2
    fi
    PYTHONPATH=$site "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --upgrade --target "$site" "$REPO" || return 2
    PYTHONPATH=$site "$PY" -c 'import hydra, omegaconf, llmtrain' || return 2
}

case "${1:-}" in
    --fetch-wheels) fetch_wheels; exit $? ;;
    --install-only)
        site=${GPU_CHECK_OUT:-$REPO/outputs/gpu_check}/site
        install "$site" || exit $?
        echo "installed; use: export PYTHONPATH=$site"
        exit 0 ;;
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "error: unknown option ${1}; expected --fetch-wheels, --install-only or nothing" >&2; exit 2 ;;
esac

# 1. A GPU, or stop at once, before installing anything.
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "no GPU found: $PY (the Python that should hold torch) is not on PATH; nothing was run"
    exit 1
fi
found=$("$PY" "$STAGES" detect) || { echo "$found"; exit 1; }

OUT=${GPU_CHECK_OUT:-$REPO/outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
echo "GPU check: $found; results in $OUT" >&2

# 2. llmtrain and the carried wheels.
install "$OUT/site" >"$OUT/logs/install.log" 2>&1 || { cat "$OUT/logs/install.log" >&2; exit 2; }
export PYTHONPATH=$OUT/site${PYTHONPATH:+:$PYTHONPATH}
gpus=${found%% x *}

# 3. The stages, each with its own limit, all within the budget.
stage() {  # stage RESULT_NAME LIMIT_S ARGS... (RESULT_NAME.json is what the stage writes)
    local name=$1 limit=$2 left=$((BUDGET - SECONDS))
    shift 2
    if ((left < 30)); then
        "$PY" "$STAGES" missing "$OUT" "$name" --skipped --note "not run: the ${BUDGET} s budget was spent"
        return
    fi
    ((limit > left)) && limit=$left
    echo "[$(date +%T)] $name (up to ${limit} s)" >&2
    # a run stops itself 10 s before the stage's limit, so its row says so rather than going missing
    GPU_CHECK_RUN_TIMEOUT_S=$((limit - 10)) timeout -k 20 "$limit" "$PY" "$STAGES" "$@" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    [ -f "$OUT/$name.json" ] || "$PY" "$STAGES" missing "$OUT" "$name" \
        --note "no result (exit $rc$( ((rc == 124)) && echo ", over its ${limit} s")); see logs/$name.log"
}

"$PY" "$STAGES" env "$OUT"
stage kernels 120 kernels "$OUT"
stage optim 150 optim "$OUT"
stage train_llama_tiny 90 train "$OUT" llama_tiny
stage train_llama_tiny_compile 150 train "$OUT" llama_tiny_compile
stage train_llama_1b 150 train "$OUT" llama_1b
stage train_llama_1b_compile 240 train "$OUT" llama_1b_compile
if ((gpus >= 2)); then
    stage nccl 120 nccl "$OUT"
else
    "$PY" "$STAGES" missing "$OUT" nccl --skipped --note "one GPU: the 2-rank NCCL run needs two"
fi
stage train_llama_tiny_fp16 90 train "$OUT" llama_tiny_fp16

"$PY" "$STAGES" table "$OUT" --elapsed "$SECONDS"
