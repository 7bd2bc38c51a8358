#!/usr/bin/env bash
# AMoPO on Qwen2.5-7B-Instruct, one node of 8 x 80 GB GPUs: TP2 x PP1 x DP4, micro-batch 1 group.
# Layout from: python tools/plan_parallelism.py --model examples/model_configs/qwen2.5-7b.json --gpus 8
# (first choice: 53.2 GiB estimated peak; micro-batch 2 would be about 72.5 GiB of 74 usable, too tight).
# Run from anywhere:  RUN_ROOT=/scratch/me/amopo HF_MODEL=/models/Qwen2.5-7B-Instruct bash examples/qwen2.5_7b_single_node.sh
# Rerunning resumes from the newest checkpoint under $SAVE; SIGTERM/SIGUSR1 save and stop.
set -euo pipefail

# ---- site and run settings -------------------------------------------------------------
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
HF_MODEL=${HF_MODEL:-/models/Qwen2.5-7B-Instruct}
RUN_ROOT=${RUN_ROOT:-$REPO/runs}
DATA_INPUT=${DATA_INPUT:-$REPO/data/helpsteer2/train_rows.jsonl}
DATA_FORMAT=${DATA_FORMAT:-helpsteer2}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
# torchrun sets 1 per worker anyway, with a banner on every launch; saying so here keeps the console quiet
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# ---- model and layout ------------------------------------------------------------------
MODEL_NAME=qwen2.5_7b
TP=${TP:-2} PP=${PP:-1} MBS=${MBS:-1}

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron: ordered TP/SP comm kernels
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# shellcheck source=examples/lib/amopo_recipe.sh
source "$REPO/examples/lib/amopo_recipe.sh"
amopo_defaults
amopo_convert
amopo_preprocess
amopo_prepare_save_dir
amopo_train_args
if ! amopo_training_done; then
  "$TORCHRUN" --standalone --nproc-per-node "$GPUS_PER_NODE" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 110 \
    "$REPO/pretrain_amopo.py" "${TRAIN_ARGS[@]}"
fi
if amopo_training_done; then
  amopo_export
  amopo_log "done: $EXPORT"
else
  amopo_log "stopped before the last step; run this script again to resume from $SAVE"
fi
