#!/usr/bin/env bash
# The experiment of docs/RESULTS.md: SmolLM2-135M-Instruct aligned on HelpSteer2 prompts on 2 CPU processes,
# four arms at the same budget and seed, evaluated per dimension on held-out prompts, plus controllability.
#
#   arms: AMoPO gaussian (published code), AMoPO gaussian-inverse (paper text), AMoPO equal weights, and
#         single-objective SimPO on the general pair only (--amopo-weighting fixed 1 0 ... 0: the dimension
#         pairs are computed but get weight 0, so every arm costs the same tokens)
#   held-out: HelpSteer2 prompts split off by tools/split_data.py (80,0,20, seed 1234), minus every prompt the
#         learning-rate sweep (examples/smollm2_helpsteer2_lr_sweep.sh, run first) trained or validated on
#   controllability: greedy replies at requested verbosity 0, 2, 4 before and after the gaussian arm
# Run from the repository root after `make install` and the sweep; LR is the sweep's choice.
set -euo pipefail

OUT=${OUT:-runs/smollm2_arms}
SWEEP=${SWEEP:-runs/smollm2_lr_sweep}
LR=${LR:-5e-4}                     # the sweep's choice (docs/RESULTS.md)
TRAIN_PROMPTS=${TRAIN_PROMPTS:-40}
HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-48}
CONTROL_PROMPTS=${CONTROL_PROMPTS:-12}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}  # greedy replies of this model often loop: a low cap makes every length equal
ARMS=${ARMS:-"gaussian gaussian-inverse equal simpo"}
# shellcheck source=examples/lib/smollm2_helpsteer2.sh
source "$(dirname "$0")/lib/smollm2_helpsteer2.sh"
# shellcheck disable=SC2206
DIMS=($DIMENSIONS)
STEPS=$(( TRAIN_PROMPTS / GLOBAL_BATCH ))  # one epoch

for f in "$SWEEP/sweep_train.jsonl" "$SWEEP/valid.jsonl"; do
  [[ -f $f ]] || { echo "missing $f: run examples/smollm2_helpsteer2_lr_sweep.sh first" >&2; exit 1; }
done
mkdir -p "$OUT"
prepare_model
[[ -f $OUT/split/heldout.jsonl ]] || $PYTHON tools/split_data.py --input "$HS2_ROWS" --output "$OUT/split" \
  --split 80,0,20 --seed "$SEED"
SOURCE_ROWS=$OUT/split/train.jsonl select_rows train "$TRAIN_PROMPTS" 0
SOURCE_ROWS=$OUT/split/heldout.jsonl select_rows heldout "$HELDOUT_PROMPTS" 0 "$SWEEP/sweep_train.jsonl" \
  "$SWEEP/valid.jsonl"
preprocess train
preprocess heldout

control() {  # control MODEL NAME
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PYTHON tools/evaluate_control.py --model "$1" \
    --input "$OUT/heldout.jsonl" --dimension verbosity --scores 0 2 4 --num-prompts "$CONTROL_PROMPTS" \
    --max-new-tokens "$MAX_NEW_TOKENS" --output "$OUT/control_$2.json"
}

[[ -f $OUT/groups_untrained.jsonl ]] || evaluate "$OUT/megatron_init" "$OUT/data_heldout" untrained
[[ -f $OUT/control_untrained.json ]] || control "${HF_INIT:-$OUT/hf_init}" untrained
for arm in $ARMS; do
  [[ -f $OUT/groups_$arm.jsonl ]] && continue
  case $arm in
    simpo)  # SimPO on the general pair: weight 1 on pair 0, 0 on every dimension pair
      zeros=()
      for _ in "${DIMS[@]}"; do zeros+=(0); done
      weighting=(--amopo-weighting fixed --amopo-fixed-weights 1 "${zeros[@]}") ;;
    *) weighting=(--amopo-weighting "$arm") ;;
  esac
  rm -rf "${OUT:?}/$arm"
  train "$arm" "$OUT/megatron_init" "$OUT/data_train" --train-iters "$STEPS" --lr "$LR" \
    --lr-warmup-fraction 0.1 --clip-grad 1.0 "${weighting[@]}"
  evaluate "$OUT/$arm" "$OUT/data_heldout" "$arm"
  if [[ $arm == gaussian ]]; then
    $PYTHON tools/convert_megatron_to_hf.py --load "$OUT/gaussian" --save "$OUT/hf_gaussian"
    control "$OUT/hf_gaussian" gaussian
  fi
done

table=()
for arm in $ARMS; do table+=(--arm "$arm=$OUT/groups_$arm.jsonl"); done
$PYTHON tools/compare_evals.py --baseline "$OUT/groups_untrained.jsonl" "${table[@]}" --output "$OUT/table.md"
# shellcheck disable=SC2086  # ARMS is a space-separated list of arm names, one argument each
$PYTHON - "$OUT" "$SEED" $ARMS <<'PY' | tee "$OUT/runs.md"
import json, sys
out, seed, arms = sys.argv[1], sys.argv[2], sys.argv[3:]
print("| arm | steps | groups | tokens | wall time (s, train) | seed |\n|---|---|---|---|---|---|")
for arm in arms:
    train = [r for r in map(json.loads, open(f"{out}/{arm}/metrics.jsonl")) if r["kind"] == "train"]
    wall = open(f"{out}/{arm}/wall_s").read().strip()
    print(f"| {arm} | {len(train)} | {int(train[-1]['consumed_samples'])} | {int(sum(r['tokens'] for r in train))} "
          f"| {wall} | {seed} |")
for name in ("untrained", "gaussian"):
    c = json.load(open(f"{out}/control_{name}.json"))
    levels = ", ".join(f"{s}: {v['mean_length']:.1f} ({v['at_max_new_tokens']} capped)"
                       for s, v in c["per_score"].items())
    print(f"control {name}: mean reply tokens at verbosity {levels}; Spearman {c['spearman_score_length']:.3f} "
          f"over {len(c['replies'])} replies")
PY
