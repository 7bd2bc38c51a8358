#!/usr/bin/env bash
# Learning-rate choice for examples/smollm2_helpsteer2_arms.sh, on a VALIDATION split (never the held-out one).
#
# SmolLM2-135M-Instruct, AMoPO gaussian, the experiment's dimensions and sequence length, a tiny budget
# (SWEEP_STEPS steps of GLOBAL_BATCH groups) for each of LRS; each run is evaluated on VALID_PROMPTS
# validation prompts. sweep_train.jsonl and valid.jsonl list the prompts used here: the arms script
# leaves every one of them out of its held-out evaluation. Run from the repository root after `make install`.
set -euo pipefail

OUT=${OUT:-runs/smollm2_lr_sweep}
LRS=${LRS:-"2e-5 6e-5 2e-4"}
SWEEP_TRAIN_PROMPTS=${SWEEP_TRAIN_PROMPTS:-40}
VALID_PROMPTS=${VALID_PROMPTS:-16}
SWEEP_STEPS=${SWEEP_STEPS:-4}
# shellcheck source=examples/lib/smollm2_helpsteer2.sh
source "$(dirname "$0")/lib/smollm2_helpsteer2.sh"

mkdir -p "$OUT"
prepare_model
# The shortest prompts train (as in the arms script); the next ones validate.
select_rows sweep_train "$SWEEP_TRAIN_PROMPTS" 0
select_rows valid "$VALID_PROMPTS" "$SWEEP_TRAIN_PROMPTS"
preprocess sweep_train
preprocess valid
[[ -f $OUT/groups_valid_untrained.jsonl ]] || evaluate "$OUT/megatron_init" "$OUT/data_valid" valid_untrained
for lr in $LRS; do
  [[ -f $OUT/groups_valid_lr$lr.jsonl ]] && continue
  rm -rf "$OUT/lr$lr"
  train "lr$lr" "$OUT/megatron_init" "$OUT/data_sweep_train" --train-iters "$SWEEP_STEPS" --lr "$lr" \
    --lr-warmup-fraction 0.1 --clip-grad 1.0
  evaluate "$OUT/lr$lr" "$OUT/data_valid" "valid_lr$lr"
done
arms=()
for lr in $LRS; do arms+=(--arm "lr $lr=$OUT/groups_valid_lr$lr.jsonl"); done
$PYTHON tools/compare_evals.py --baseline "$OUT/groups_valid_untrained.jsonl" "${arms[@]}" --output "$OUT/table.md"
