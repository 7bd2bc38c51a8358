#!/usr/bin/env bash
# One more AMoPO gaussian arm of examples/smollm2_helpsteer2_arms.sh at another learning rate (LR), on the same
# training and held-out groups, with its controllability measurement. Run after the arms script (it reuses
# $OUT/megatron_init, $OUT/data_train, $OUT/data_heldout, $OUT/heldout.jsonl and the untrained evaluation).
set -euo pipefail

OUT=${OUT:-runs/smollm2_arms}
LR=${LR:?set LR}
TRAIN_PROMPTS=${TRAIN_PROMPTS:-40}
CONTROL_PROMPTS=${CONTROL_PROMPTS:-12}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}
# shellcheck source=examples/lib/smollm2_helpsteer2.sh
source "$(dirname "$0")/lib/smollm2_helpsteer2.sh"
name=gaussian_lr$LR

rm -rf "${OUT:?}/$name"
train "$name" "$OUT/megatron_init" "$OUT/data_train" --train-iters $(( TRAIN_PROMPTS / GLOBAL_BATCH )) --lr "$LR" \
  --lr-warmup-fraction 0.1 --clip-grad 1.0 --amopo-weighting gaussian
evaluate "$OUT/$name" "$OUT/data_heldout" "$name"
$PYTHON tools/convert_megatron_to_hf.py --load "$OUT/$name" --save "$OUT/hf_$name" --overwrite
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PYTHON tools/evaluate_control.py --model "$OUT/hf_$name" \
  --input "$OUT/heldout.jsonl" --dimension verbosity --scores 0 2 4 --num-prompts "$CONTROL_PROMPTS" \
  --max-new-tokens "$MAX_NEW_TOKENS" --output "$OUT/control_$name.json"
$PYTHON tools/compare_evals.py --baseline "$OUT/groups_untrained.jsonl" --arm "gaussian lr $LR=$OUT/groups_$name.jsonl"
