# shellcheck shell=bash
# The body of every examples/slurm/*.sbatch file, sourced after its variables:
# convert and preprocess once (one task on the first node), train on all nodes with
# one srun of launch_node.sh, requeue on preemption, export when the last step is saved.
#
# Preemption: `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to this shell 120 s before the
# time limit; it is passed to the training step (scancel --signal=USR1), the workers save
# and exit, and the job requeues itself. On restart --load is the save directory.
set -euo pipefail

: "${SLURM_JOB_ID:?submit with sbatch}" "${SLURM_NNODES:?}"
export REPO GPUS_PER_NODE MASTER_PORT
LOG_DIR=${LOG_DIR:-$REPO/logs/$SLURM_JOB_ID}
export LOG_DIR
mkdir -p "$LOG_DIR"

# NCCL: documented defaults; a site sets its fabric here (or in the environment).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                    # INFO to debug hangs and topology
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron: ordered TP/SP comm kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail fast on a dead peer
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [[ -n ${NCCL_SOCKET_IFNAME:-} ]]; then export NCCL_SOCKET_IFNAME; fi  # e.g. ib0 / eth0 for bootstrap
if [[ -n ${NCCL_IB_HCA:-} ]]; then export NCCL_IB_HCA; fi              # e.g. mlx5 (InfiniBand adapters)

SRUN_EXTRA=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then  # pyxis/enroot; mount the repo and RUN_ROOT
  SRUN_EXTRA+=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO,$RUN_ROOT:$RUN_ROOT}")
fi
RUN_ON_ONE_NODE=(srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${SRUN_EXTRA[@]}")

# shellcheck source=examples/lib/amopo_recipe.sh
source "$REPO/examples/lib/amopo_recipe.sh"
amopo_defaults
amopo_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES nodes: $MODEL_NAME TP$TP PP$PP mbs $MBS"

PREEMPTED=0
# shellcheck disable=SC2329  # called by the USR1 trap
on_preempt() {
  PREEMPTED=1
  amopo_log "SIGUSR1: asking the training step to save and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
trap on_preempt USR1

amopo_convert
amopo_preprocess
amopo_prepare_save_dir
amopo_train_args
status=0
if ! amopo_training_done; then
  # In the background so that the trap runs as soon as the signal arrives.
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${SRUN_EXTRA[@]}" \
    bash "$REPO/examples/slurm/launch_node.sh" "${TRAIN_ARGS[@]}" &
  train_pid=$!
  while :; do
    wait "$train_pid" && status=0 || status=$?
    kill -0 "$train_pid" 2>/dev/null || break  # still running: the wait was cut short by the trap
  done
fi

if ((PREEMPTED)); then
  amopo_log "requeueing job $SLURM_JOB_ID; it resumes from $SAVE"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if amopo_training_done; then
  amopo_export
  amopo_log "done: $EXPORT"
  exit 0
fi
amopo_log "training exited with status $status before its last step; not requeueing (see $LOG_DIR)"
exit "$((status == 0 ? 1 : status))"
