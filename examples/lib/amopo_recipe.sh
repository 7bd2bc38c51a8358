# shellcheck shell=bash
# Stages shared by every recipe: convert -> preprocess -> train (resumable) -> export.
# Sourced by examples/*.sh and examples/slurm/*.sbatch after they set the variables below;
# each stage is idempotent, so a requeued or rerun job skips what is already done.
#
# Required: REPO HF_MODEL RUN_ROOT MODEL_NAME DATA_INPUT DATA_FORMAT TP PP MBS
# Optional: PYTHON (python) SEQ_LENGTH (1024) GLOBAL_BATCH (128) EPOCHS (3) LR (3e-7)
#           BETA (0.8) GAMMA (2.0) CLIP_GRAD (3.0) WARMUP (0.1) PAIR_REDUCTION (mean)
#           SAVE_INTERVAL (100) KEEP_LAST (2)
#           SPLIT (98,2) EVAL_INTERVAL (100) PREPROCESS_WORKERS (8) EXTRA_TRAIN_ARGS (array)
#           RUN_ON_ONE_NODE (array: a command prefix for CPU stages, e.g. "srun --nodes=1 --ntasks=1")

amopo_defaults() {
  : "${REPO:?set REPO to the megatron-amopo checkout}" "${HF_MODEL:?set HF_MODEL to a Hugging Face model directory}"
  : "${RUN_ROOT:?set RUN_ROOT}" "${MODEL_NAME:?}" "${DATA_INPUT:?set DATA_INPUT to the preference data file}"
  : "${DATA_FORMAT:?}" "${TP:?}" "${PP:?}" "${MBS:?}"
  PYTHON=${PYTHON:-python}
  # The published run script's settings (run_amopo/run_bash_accelerate.sh): SimPO, beta 0.8, gamma 2.0,
  # lr 3e-7, 3 epochs, cosine, warm-up 0.1, max_grad_norm 3.0, cutoff 1024. PAIR_REDUCTION mean puts the loss
  # on their scale (their per-device batch is 1), so CLIP_GRAD 3.0 and LR mean what theirs mean; with sum
  # (the paper's formula) the loss and gradients are P = D+1 times larger: clip at 3.0 x P for the same
  # clipping. GLOBAL_BATCH 128 is ours (theirs: total batch 2), see docs/SCALING.md.
  SEQ_LENGTH=${SEQ_LENGTH:-1024} GLOBAL_BATCH=${GLOBAL_BATCH:-128} EPOCHS=${EPOCHS:-3} LR=${LR:-3e-7}
  BETA=${BETA:-0.8} GAMMA=${GAMMA:-2.0} CLIP_GRAD=${CLIP_GRAD:-3.0} WARMUP=${WARMUP:-0.1}
  PAIR_REDUCTION=${PAIR_REDUCTION:-mean}
  SAVE_INTERVAL=${SAVE_INTERVAL:-100} KEEP_LAST=${KEEP_LAST:-2} SPLIT=${SPLIT:-98,2}
  EVAL_INTERVAL=${EVAL_INTERVAL:-100} PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-8}
  CONVERTED=${CONVERTED:-$RUN_ROOT/$MODEL_NAME-mcore}
  DATA_DIR=${DATA_DIR:-$RUN_ROOT/data/$MODEL_NAME-$DATA_FORMAT-s$SEQ_LENGTH}
  SAVE=${SAVE:-$RUN_ROOT/$MODEL_NAME-amopo}
  EXPORT=${EXPORT:-$RUN_ROOT/$MODEL_NAME-amopo-hf}
  if ! declare -p EXTRA_TRAIN_ARGS >/dev/null 2>&1; then EXTRA_TRAIN_ARGS=(); fi
  if ! declare -p RUN_ON_ONE_NODE >/dev/null 2>&1; then RUN_ON_ONE_NODE=(); fi
}

amopo_log() { echo "[amopo $(date '+%F %T')] $*"; }

# HF model -> Megatron checkpoint root (once; refused up front if TP/PP cannot work).
amopo_convert() {
  if [[ -f $CONVERTED/latest_checkpointed_iteration.txt ]]; then
    amopo_log "converted model present: $CONVERTED"
    return 0
  fi
  amopo_log "converting $HF_MODEL -> $CONVERTED"
  "${RUN_ON_ONE_NODE[@]}" "$PYTHON" "$REPO/tools/convert_hf_to_megatron.py" --hf-path "$HF_MODEL" \
    --save "$CONVERTED" --overwrite --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP"
}

# Preference rows -> groups of 2(D+1) token sequences (once), with the model's own tokenizer.
amopo_preprocess() {
  if [[ -f $DATA_DIR/metadata.json ]]; then
    amopo_log "dataset present: $DATA_DIR"
    return 0
  fi
  amopo_log "preprocessing $DATA_INPUT -> $DATA_DIR"
  "${RUN_ON_ONE_NODE[@]}" "$PYTHON" "$REPO/tools/preprocess_data.py" --input "$DATA_INPUT" --format "$DATA_FORMAT" \
    --tokenizer "$HF_MODEL" --output "$DATA_DIR" --seq-length "$SEQ_LENGTH" --workers "$PREPROCESS_WORKERS" \
    --overwrite --no-progress
}

# --load: the run's own checkpoints once there are any (resume), else the converted model.
amopo_load_dir() {
  if [[ -f $SAVE/latest_checkpointed_iteration.txt ]]; then echo "$SAVE"; else echo "$CONVERTED"; fi
}

# The save directory carries the model metadata and tokenizer, so that it can be
# resumed from and exported like the converted model it started from.
amopo_prepare_save_dir() {
  mkdir -p "$SAVE"
  [[ -f $SAVE/amopo_model.json ]] || cp "$CONVERTED/amopo_model.json" "$SAVE/"
  if [[ -d $CONVERTED/tokenizer && ! -d $SAVE/tokenizer ]]; then cp -r "$CONVERTED/tokenizer" "$SAVE/"; fi
}

# Fills the array TRAIN_ARGS with pretrain_amopo.py's flags.
amopo_train_args() {
  TRAIN_ARGS=(
    --load "$(amopo_load_dir)" --save "$SAVE" --save-interval "$SAVE_INTERVAL" --keep-last "$KEEP_LAST"
    --data-path "$DATA_DIR" --split "$SPLIT" --eval-interval "$EVAL_INTERVAL"
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --micro-batch-size "$MBS" --global-batch-size "$GLOBAL_BATCH" --train-epochs "$EPOCHS"
    --seq-length "$SEQ_LENGTH" --batch-layout padded --bf16
    --amopo-loss simpo --amopo-beta "$BETA" --amopo-gamma "$GAMMA" --amopo-pair-reduction "$PAIR_REDUCTION"
    --lr "$LR" --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction "$WARMUP" --clip-grad "$CLIP_GRAD"
  )
  if ((TP > 1)); then TRAIN_ARGS+=(--sequence-parallel); fi
  TRAIN_ARGS+=(--use-distributed-optimizer "${EXTRA_TRAIN_ARGS[@]}")
}

# True when the newest checkpoint is the last step (config.yaml's derived train_iters).
amopo_training_done() {
  local latest total
  [[ -f $SAVE/latest_checkpointed_iteration.txt && -f $SAVE/config.yaml ]] || return 1
  latest=$(<"$SAVE/latest_checkpointed_iteration.txt")
  total=$(awk '/^derived:/ {d = 1} d && $1 == "train_iters:" {print $2; exit}' "$SAVE/config.yaml")
  [[ -n $total && $latest -ge $total ]]
}

# Newest checkpoint -> Hugging Face model directory.
amopo_export() {
  amopo_log "exporting $SAVE -> $EXPORT"
  "${RUN_ON_ONE_NODE[@]}" "$PYTHON" "$REPO/tools/convert_megatron_to_hf.py" --load "$SAVE" --save "$EXPORT" --overwrite
}
