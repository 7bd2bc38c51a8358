#!/usr/bin/env bash
# GPU check for a one-GPU machine without internet (Python 3.12, torch with CUDA preinstalled).
#
# Run from the repository root, with megatron-core carried as a wheel in .whl/ (see docs/GPU.md):
#     bash benchmarks/gpu_check.sh [OUTDIR]          # OUTDIR defaults to $OUT, else /tmp/gpu_check
# Steps (about 5 minutes on an H200, bounded by per-step timeouts to stay under 8):
#   1. install the carried wheels into /tmp/site; pip install -e . (builds the C++ extension)
#   2. report the card, torch, and whether Transformer Engine is importable
#   3. the GPU test subset: SDPA attention (flash / memory-efficient kernels), THD bookkeeping,
#      the benchmark's end-to-end test
#   4. bench_train_step.py for the Qwen2.5-0.5B and 1.5B shapes at sequence length 1024, 4 samples per
#      step in 4 micro-batches (the baseline needs ~80 GiB at 1.5B: use an H200, kind nvidia-h200)
#   5. the fused output layer (--amopo-output-layer fused): ours alone at 0.5B and 1.5B, to set against step 4's
#      tokens/s and peak memory, and at 0.5B with twice the micro-batch (the memory it frees)
#   6. with GPU_CHECK_VARIANTS=1 (about 2 more minutes), or a comma list of packed-mask, packed-thd,
#      no-fusions, profile: ours alone at 1.5B with a speed-up swapped or turned off, or profiled
# Each step's result is printed; the exit status is non-zero if any step failed.
set -uo pipefail
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

stamp "install"
gpu_install || exit 1

step "gpu tests" 170 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs \
  tests/unit/test_sdpa_attention.py tests/unit/test_gpu_fusions.py tests/unit/test_packed_thd.py \
  tests/unit/test_fused_logprobs.py tests/e2e/test_bench_train_step.py

for model in qwen2.5-0.5b qwen2.5-1.5b; do
  step "bench $model" 150 "$PY" benchmarks/bench_train_step.py --model "$model" --seq-length 1024 \
    --micro-batch 1 --num-microbatches 4 --dims 4 --steps 5 --warmup 2 --json "$OUTDIR/bench_${model}.json"
done

for model in qwen2.5-0.5b qwen2.5-1.5b; do
  step "fused output layer $model" 120 "$PY" benchmarks/bench_train_step.py --model "$model" --seq-length 1024 \
    --micro-batch 1 --num-microbatches 4 --dims 4 --steps 5 --warmup 2 --sides ours --output-layer fused \
    --json "$OUTDIR/fused_${model}.json"
done
step "fused output layer qwen2.5-0.5b micro-batch 2" 120 "$PY" benchmarks/bench_train_step.py --model qwen2.5-0.5b \
  --seq-length 1024 --micro-batch 2 --num-microbatches 2 --dims 4 --steps 5 --warmup 2 --sides ours \
  --output-layer fused --json "$OUTDIR/fused_qwen2.5-0.5b_mb2.json"

VARIANTS=${GPU_CHECK_VARIANTS:-}
[ "$VARIANTS" = 1 ] && VARIANTS=packed-mask,no-fusions,profile
common=(--model qwen2.5-1.5b --seq-length 1024 --micro-batch 1 --num-microbatches 4 --dims 4 --sides ours
        --steps 3 --warmup 2)
for variant in ${VARIANTS//,/ }; do
  case $variant in
    packed-mask) extra=(--layout packed-mask) ;;        # rows with their block-diagonal mask
    packed-thd) extra=(--layout packed-thd) ;;
    no-fusions) extra=(--disable "swiglu-fusion,fused-adam") ;;
    profile) extra=(--profile) ;;                      # the default step under torch.profiler
    *) echo "unknown variant $variant"; FAILED+=("variant $variant"); continue ;;
  esac
  step "variant $variant" 150 "$PY" benchmarks/bench_train_step.py "${common[@]}" "${extra[@]}" \
    --json "$OUTDIR/variant_${variant}.json"
done

finish
