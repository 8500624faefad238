#!/usr/bin/env bash
# The prepared GPU session: one command for a short window on a lent H100/H200.
#
#   bash benchmarks/gpu_session.sh OUT_DIR           # on the GPU machine (device tool: OUT_DIR=$OUT)
#   bash benchmarks/gpu_session.sh OUT_DIR --smoke   # anywhere: every step in its smoke mode
#
# Installs the package offline (the GPU machine has no network; its image has torch, triton,
# transformers, peft, safetensors), runs the bf16 CUDA tests, then the goal cases of every
# kernel benchmark and of the training benchmark, each under its own time limit (8 minutes
# at most in all), so the session ends well inside one 10-minute call. Every result row goes to
# OUT_DIR/<bench>.jsonl, every step's output to OUT_DIR/<step>.log, and OUT_DIR/summary.txt
# lists each step's exit status.
# Commit first: the rows carry SPARSE_ENGINE_COMMIT (the tree travels without .git), taken
# from the environment or from `git rev-parse HEAD` where .git exists.
# Without CUDA (and without --smoke) it says so and stops with status 0, having run nothing.
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash benchmarks/gpu_session.sh OUT_DIR [--smoke]" >&2
    exit 2
fi
OUT_DIR=$1
SMOKE=0
[[ "${2:-}" == "--smoke" ]] && SMOKE=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
SUMMARY=$OUT_DIR/summary.txt
: > "$SUMMARY"

if [[ $SMOKE == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device here: nothing run (use --smoke for a CPU check of every step)" | tee -a "$SUMMARY"
    exit 0
fi

if [[ -z "${SPARSE_ENGINE_COMMIT:-}" ]]; then
    SPARSE_ENGINE_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo uncommitted)
fi
export SPARSE_ENGINE_COMMIT TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
if [[ $SMOKE == 1 ]]; then
    export TRITON_INTERPRET=1
fi

# step NAME SECONDS COMMAND...: run one step under a time limit; a failed or stopped step is
# recorded and the session goes on (a benchmark appends each row as it is measured).
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local status=$?
    local note=""
    [[ $status == 124 || $status == 137 ]] && note=" (stopped at its ${limit} s limit)"
    printf '%-22s exit %3d  %4d s%s\n' "$name" "$status" $((SECONDS - start)) "$note" | tee -a "$SUMMARY"
}

if [[ $SMOKE == 0 ]]; then
    step install 45 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    step cuda-tests 100 "$PY" -m pytest tests/kernels tests/engine/test_backends.py -q -x -p no:cacheprovider
    step topk 55 "$PY" benchmarks/bench_topk.py --ratios 0.01 0.1 0.5 --dtypes fp32 bf16 \
        --sources scores fused tiles fused-block --out "$OUT_DIR/topk.jsonl"
    step block-sparse 65 "$PY" benchmarks/bench_block_sparse.py --keep 0.1 --tokens 8192 \
        --results "$OUT_DIR/block_sparse.jsonl"
    step masked-delta 65 "$PY" benchmarks/bench_masked_delta.py --tokens 8192 --out "$OUT_DIR/masked_delta.jsonl"
    step multi-adapter 55 "$PY" benchmarks/bench_multi_adapter.py --adapters 64 --batch 64 256 \
        --results "$OUT_DIR/multi_adapter.jsonl"
    # one training step per method, per layer and on a 32-layer bf16 Phi-3-mini shape
    step training 100 "$PY" benchmarks/bench_training.py --out "$OUT_DIR/training.jsonl"
else
    for bench in topk block_sparse masked_delta multi_adapter training; do
        step "$bench" 300 "$PY" "benchmarks/bench_$bench.py" --smoke
    done
fi
echo "rows: $(cat "$OUT_DIR"/*.jsonl 2>/dev/null | wc -l) in $OUT_DIR; commit $SPARSE_ENGINE_COMMIT" | tee -a "$SUMMARY"
