#!/usr/bin/env bash
# The product's entry points on one GPU, stage by stage, each printing PASS or FAIL (docs/GPU.md).
#
#     bash benchmarks/gpu_e2e.sh [OUTDIR]          # GPU: bf16, cpu:gloo,cuda:nccl; megatron-core carried in .whl/
#     bash benchmarks/gpu_e2e.sh --cpu [OUTDIR]    # CPU rehearsal: gloo, fp32, tiny shapes (slow: see docs/GPU.md)
#     bash benchmarks/gpu_e2e.sh [--cpu] --dry     # check every flag it passes against the tools' --help; run nothing
# OUTDIR defaults to $OUT, else /tmp/gpu_e2e. Stages:
#   install   (GPU) the carried wheels and this package (gpu_env.sh)
#   1 tiny    a tiny Qwen2 model with the real Qwen2 tokenizer          tools/make_tiny_model.py
#   2 import  HF -> Megatron, logits compared                           tools/convert_hf_to_megatron.py --check
#   3 data    the first bundled HelpSteer2 rows -> AMoPO groups         tools/preprocess_data.py
#   4 train   torchrun pretrain_amopo.py (--bf16 on GPU) with evaluation and saves, uninterrupted; then the same
#             run SIGTERMed mid-training (it saves and exits 0) and resumed to the end. Every step's loss must
#             equal the uninterrupted run's to LOSS_RTOL: 2e-2 relative on GPU (bf16, eps 2^-8 = 3.9e-3:
#             about five bf16 steps, room for non-deterministic attention backward kernels), 1e-6 on CPU
#             (fp32, deterministic: resumes are bit-exact there)
#   5 eval    tools/evaluate.py on the final checkpoint: its loss equals the trainer's final validation
#             loss to LOSS_RTOL (same groups, same plan seed)
#   6 export  Megatron -> HF, the export's logits equal the Megatron model's (fp32, CPU; max |dlogit| <= 1e-4)
#                                                                        tools/convert_megatron_to_hf.py --check
#   7 speed   pretrain_amopo.py on the Qwen2.5-1.5B shape (random weights) against bench_train_step.py's
#             ours side on the same samples and batching; tokens/s and MFU taken from the trainer's own
#             metrics.jsonl (median after warm-up); PASS when trainer / bench tokens/s >= 0.95. The CPU
#             rehearsal runs it on the tiny model and only checks that both sides report numbers.
# Planned for about 7 minutes on an H200, not yet measured (the 1.5B model is written in the background
# meanwhile; each stage has a timeout). The exit status is non-zero if any stage failed.
set -uo pipefail
MODE=gpu DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --dry) DRY=1 ;;
    *) break ;;
  esac
  shift
done
OUTDIR=${1:-${OUT:-/tmp/gpu_e2e}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

if [ "$MODE" = gpu ]; then
  SEQ=1024 ROWS=200 GBS=4 ITERS=30 EVAL=10 LOSS_RTOL=2e-2 PRECISION=(--bf16) SCALE=1
  TINY=(--hidden-size 256 --ffn-hidden-size 512 --num-layers 2 --num-heads 4 --num-kv-heads 2)  # head dim 64: flash
  SPEED_ITERS=14 SPEED_WARMUP=4 BENCH_STEPS=(--steps 5 --warmup 2)
else
  SEQ=128 ROWS=60 GBS=2 ITERS=4 EVAL=2 LOSS_RTOL=1e-6 PRECISION=() SCALE=15  # timeouts x15 on a shared CPU
  TINY=(--hidden-size 64 --ffn-hidden-size 128 --num-layers 2 --num-heads 4 --num-kv-heads 2)
  SPEED_ITERS=3 SPEED_WARMUP=1 BENCH_STEPS=(--steps 2 --warmup 1)
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
O=$OUTDIR
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)
# Every command line of the stages, so that --dry can check them.
TINY_MODEL=(tools/make_tiny_model.py --arch qwen2 --tied --tokenizer data/tokenizer-qwen2 --vocab-size 151680
            "${TINY[@]}" --out "$O/hf")
IMPORT=(tools/convert_hf_to_megatron.py --hf-path "$O/hf" --save "$O/init" --check)
PREPROCESS=(tools/preprocess_data.py --input data/helpsteer2/train_rows.jsonl --limit "$ROWS" --output "$O/data"
            --tokenizer "$O/init/tokenizer" --format helpsteer2 --seq-length "$SEQ" --no-progress)
TRAIN=(pretrain_amopo.py --load "$O/init" --data-path "$O/data" --valid-data-path "$O/data" --micro-batch-size 1
       --global-batch-size "$GBS" --seq-length "$SEQ" --train-iters "$ITERS" --lr 1e-4 --lr-warmup-fraction 0
       --log-interval 1 --eval-interval "$EVAL" --save-interval "$EVAL" "${PRECISION[@]}")
# The trainer's validation plan uses --seed + 1 (training.loop.Trainer): the same plan here.
EVALUATE=(tools/evaluate.py --load "$O/run_b" --data-path "$O/data" --micro-batch-size 1 --seq-length "$SEQ"
          --seed 1235 "${PRECISION[@]}" --output "$O/eval.json")
EXPORT=(tools/convert_megatron_to_hf.py --load "$O/run_b" --save "$O/export" --check)
if [ "$MODE" = gpu ]; then SPEED_HF=$O/speed_hf SPEED_INIT=$O/speed_init; else SPEED_HF=$O/hf SPEED_INIT=$O/init; fi
# The 1.5B shape (config.json of Qwen/Qwen2.5-1.5B), random weights, converted for the trainer.
BIG_MODEL=(tools/make_tiny_model.py --arch qwen2 --tied --tokenizer data/tokenizer-qwen2 --vocab-size 151936
           --hidden-size 1536 --ffn-hidden-size 8960 --num-layers 28 --num-heads 12 --num-kv-heads 2
           --max-position-embeddings 32768 --rope-theta 1000000 --dtype bfloat16 --out "$O/speed_hf")
BIG_IMPORT=(tools/convert_hf_to_megatron.py --hf-path "$O/speed_hf" --save "$O/speed_init")
SPEED_TRAIN=(pretrain_amopo.py --load "$SPEED_INIT" --data-path "$O/data" --run-dir "$O/speed_run" --micro-batch-size 1
             --global-batch-size "$GBS" --seq-length "$SEQ" --train-iters "$SPEED_ITERS" --lr 1e-6
             --lr-warmup-fraction 0 --log-interval 1 "${PRECISION[@]}")
BENCH=(benchmarks/bench_train_step.py --model "$SPEED_HF" --data-path "$O/data" --sides ours --seq-length "$SEQ"
       --micro-batch 1 --num-microbatches "$GBS" "${BENCH_STEPS[@]}" --json "$O/speed_bench.json")

declare -A HELP=()
check_flags() {  # every --flag of a command line is one that its script's --help lists
  local script=$1 flag bad=0 n=0
  shift
  if [ -z "${HELP[$script]:-}" ]; then
    HELP[$script]=$("$PY" "$script" --help 2>&1) || { echo "$script --help failed: ${HELP[$script]}"; return 1; }
  fi
  for flag in "$@"; do
    [[ $flag == --* ]] || continue
    n=$((n + 1))
    grep -qE -- "(^|[ ,[])${flag}([ ,=]|\]|$)" <<<"${HELP[$script]}" || { echo "$script has no flag $flag"; bad=1; }
  done
  [ $bad -eq 0 ] && echo "$script: all $n flags known"
  return $bad
}
if [ "$DRY" = 1 ]; then
  for cmd in TINY_MODEL IMPORT PREPROCESS TRAIN EVALUATE EXPORT BIG_MODEL BIG_IMPORT SPEED_TRAIN BENCH; do
    declare -n line=$cmd
    stamp "dry $cmd"
    if check_flags "${line[@]}"; then echo "PASS dry $cmd"; else FAILED+=("dry $cmd"); echo "FAIL dry $cmd"; fi
    unset -n line
  done
  finish
fi

if [ "$MODE" = gpu ]; then
  stamp "install"
  gpu_install || exit 1
fi
rm -rf "$O"/hf "$O"/init "$O"/data "$O"/run_* "$O"/export "$O"/speed_* "$O"/*.log "$O"/*.json
if [ "$MODE" = gpu ]; then  # the 1.5B model is written while the tiny stages run
  { "$PY" "${BIG_MODEL[@]}" && "$PY" "${BIG_IMPORT[@]}"; } > "$O/speed_model.log" 2>&1 &
  BIG_PID=$!
fi

step "1 tiny model" $((120 * SCALE)) "$PY" "${TINY_MODEL[@]}"
step "2 import + check" $((180 * SCALE)) "$PY" "${IMPORT[@]}"
step "3 preprocess" $((120 * SCALE)) "$PY" "${PREPROCESS[@]}"

interrupted_run() {  # train in the background, SIGTERM the worker once iteration 2 is logged, then resume
  local log=$O/run_b1.log
  "${TORCHRUN[@]}" "${TRAIN[@]}" --save "$O/run_b" > "$log" 2>&1 &
  local launcher=$! workers
  until grep -q "^iter 2/" "$log"; do
    kill -0 "$launcher" 2>/dev/null || { tail -20 "$log"; echo "the run ended before iteration 2"; return 1; }
    sleep 0.2
  done
  # The worker, not torchrun: a signalled torchrun exits non-zero by design (SLURM signals the workers).
  workers=$("$PY" - "$launcher" <<'PYEOF'
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    if stat.rsplit(")", 1)[1].split()[1] == sys.argv[1]:
        print(pid)
PYEOF
)
  [ -n "$workers" ] || { echo "no worker process under torchrun $launcher"; return 1; }
  # shellcheck disable=SC2086
  kill -TERM $workers
  wait "$launcher" || { tail -20 "$log"; echo "the signalled run exited non-zero"; return 1; }
  grep -q "stop signal received" "$log" || { tail -20 "$log"; echo "no 'stop signal received' in the log"; return 1; }
  local stopped
  stopped=$(cat "$O/run_b/latest_checkpointed_iteration.txt")
  echo "SIGTERM after iteration 2: saved at iteration $stopped of $ITERS"
  [ "$stopped" -lt "$ITERS" ] || { echo "the signal landed after the last step; raise ITERS"; return 1; }
  "${TORCHRUN[@]}" "${TRAIN[@]}" --load "$O/run_b" --save "$O/run_b" > "$O/run_b2.log" 2>&1 \
    || { tail -20 "$O/run_b2.log"; return 1; }
  grep -q "starting at step $stopped" "$O/run_b2.log" || { echo "the resume did not start at step $stopped"; return 1; }
}

compare_losses() {  # every step of run_a against run_b, and the number of evaluations and saves
  "$PY" - "$O/run_a" "$O/run_b" "$ITERS" "$LOSS_RTOL" <<'PYEOF'
import json, os, sys
a_dir, b_dir, iters, rtol = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def rows(d, kind):
    return {r["iteration"]: r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if r["kind"] == kind}
a, b = rows(a_dir, "train"), rows(b_dir, "train")
assert sorted(a) == sorted(b) == list(range(1, iters + 1)), (sorted(a), sorted(b))
worst = max(abs(a[i]["loss"] - b[i]["loss"]) / abs(a[i]["loss"]) for i in a)
print(f"losses of {iters} steps, interrupted+resumed vs uninterrupted: max relative difference {worst:.3g} "
      f"(tolerance {rtol:g}); first {a[1]['loss']:.5f}, last {a[iters]['loss']:.5f}")
assert worst <= rtol, f"max relative loss difference {worst:.3g} > {rtol:g}"
assert len(rows(a_dir, "valid")) >= 2, "expected evaluations at the start and at the end"
saved = sorted(n for n in os.listdir(a_dir) if n.startswith("iter_"))
assert saved and saved[-1] == f"iter_{iters:07d}", saved
last = a[iters]
print("trainer log line fields:", {k: last[k] for k in ("tokens_per_s", "tflops_per_rank", "mfu",
                                                         "max_allocated_gib", "peak_rss_gib") if k in last})
PYEOF
}

train_and_resume() {
  "${TORCHRUN[@]}" "${TRAIN[@]}" --save "$O/run_a" > "$O/run_a.log" 2>&1 \
    || { tail -30 "$O/run_a.log"; return 1; }
  grep -E "^iter $ITERS/|^\[valid" "$O/run_a.log" | tail -3
  interrupted_run && compare_losses
}
step "4 train, SIGTERM, resume" $((300 * SCALE)) bash -c "$(declare -p O ITERS LOSS_RTOL TRAIN TORCHRUN PY; declare -f \
  interrupted_run compare_losses train_and_resume); train_and_resume"

evaluate() {
  "${TORCHRUN[@]}" "${EVALUATE[@]}" > "$O/eval.log" 2>&1 \
    || { tail -30 "$O/eval.log"; return 1; }
  "$PY" - "$O/eval.json" "$O/run_b/metrics.jsonl" "$LOSS_RTOL" <<'PYEOF'
import json, sys
ev = json.load(open(sys.argv[1]))
final = [r for r in map(json.loads, open(sys.argv[2])) if r["kind"] == "valid"][-1]
rel = abs(ev["loss"] - final["loss"]) / abs(final["loss"])
print(f"tools/evaluate.py loss {ev['loss']:.6f}, accuracy/all {ev.get('accuracy/all', float('nan')):.3f} on "
      f"{ev['samples']:.0f} samples; trainer's final validation loss {final['loss']:.6f} (relative {rel:.3g})")
assert rel <= float(sys.argv[3]), f"relative difference {rel:.3g} > {sys.argv[3]}"
PYEOF
}
step "5 evaluate" $((180 * SCALE)) \
  bash -c "$(declare -p O LOSS_RTOL EVALUATE TORCHRUN PY; declare -f evaluate); evaluate"

step "6 export + HF logits" $((180 * SCALE)) "$PY" "${EXPORT[@]}"

speed() {
  "${TORCHRUN[@]}" "${SPEED_TRAIN[@]}" > "$O/speed_run.log" 2>&1 || { tail -30 "$O/speed_run.log"; return 1; }
  grep "^iter $SPEED_ITERS/" "$O/speed_run.log"
  "$PY" "${BENCH[@]}" > "$O/speed_bench.log" 2>&1 || { tail -30 "$O/speed_bench.log"; return 1; }
  grep -A3 "^side" "$O/speed_bench.log"
  "$PY" - "$O/speed_run/metrics.jsonl" "$O/speed_bench.json" "$SPEED_WARMUP" "$MODE" <<'PYEOF'
import json, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r["kind"] == "train" and r["iteration"] > int(sys.argv[3])]
bench = json.load(open(sys.argv[2]))["results"][0]
tok = statistics.median(r["tokens_per_s"] for r in rows)
mfu = statistics.median(r["mfu"] for r in rows) if all("mfu" in r for r in rows) else None
ratio = tok / bench["tokens_per_s"]
fmt = lambda m: "n/a" if m is None else f"{100 * m:.1f}%"
print(f"trainer (median of {len(rows)} steps): {tok:,.0f} tokens/s, MFU {fmt(mfu)}; "
      f"bench_train_step ours: {bench['tokens_per_s']:,.0f} tokens/s, MFU {fmt(bench['mfu'])}")
print(f"trainer / bench tokens/s: {ratio:.3f} (goal >= 0.95)")
if sys.argv[4] == "gpu":
    assert mfu is not None and bench["mfu"] is not None, "no MFU: is the card in throughput.PEAK_TFLOPS?"
    assert ratio >= 0.95, f"the trainer reaches {ratio:.3f} of the benchmark's tokens/s, goal 0.95"
else:
    assert tok > 0 and bench["tokens_per_s"] > 0
PYEOF
}
SPEED=(bash -c "$(declare -p O SPEED_ITERS SPEED_WARMUP MODE SPEED_TRAIN BENCH TORCHRUN PY; declare -f speed); speed")
if [ "$MODE" = gpu ]; then
  stamp "waiting for the 1.5B model (make_tiny_model + convert, started at the beginning)"
  if wait "$BIG_PID"; then
    step "7 speed (1.5B shape)" 240 "${SPEED[@]}"
  else
    tail -20 "$O/speed_model.log"
    FAILED+=("7 speed (writing the 1.5B model failed)")
    echo "FAIL 7 speed (writing the 1.5B model failed)"
  fi
else
  step "7 speed (tiny, rehearsal)" $((300 * SCALE)) "${SPEED[@]}"
fi
finish
