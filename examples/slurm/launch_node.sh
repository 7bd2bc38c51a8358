#!/usr/bin/env bash
# One node's torchrun for a multi-node run: the job script starts this once per node with
#   srun --ntasks-per-node=1 bash examples/slurm/launch_node.sh <pretrain_amopo.py flags>
# Static rendezvous on the job's first node; node rank = SLURM_NODEID, so global ranks
# are node-major and tensor-parallel groups (consecutive ranks) stay inside a node.
set -euo pipefail

: "${SLURM_JOB_NODELIST:?run under srun in a SLURM job}" "${SLURM_NNODES:?}" "${SLURM_NODEID:?}" "${SLURM_JOB_ID:?}"
: "${REPO:?set REPO to the megatron-amopo checkout}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z ${MASTER_ADDR:-} ]]; then  # the first node (read fully: `| head` would break the pipe under pipefail)
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MASTER_ADDR=${hosts[0]}
fi
LOG_DIR=${LOG_DIR:-$REPO/logs/$SLURM_JOB_ID}
TORCHRUN=${TORCHRUN:-torchrun}
# torchrun sets 1 per worker anyway, with a banner on every launch; saying so here keeps the console quiet
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Seconds torchrun gives the workers to finish their step and save after SIGUSR1/SIGTERM
# before it kills them; keep it below the --signal lead time of the job script.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-110}

node_logs="$LOG_DIR/node$SLURM_NODEID"
mkdir -p "$node_logs"
# torchrun forwards SIGUSR1 (SLURM's preemption warning) to the workers, whose handler
# finishes the step, saves a checkpoint and exits 0 (megatron_amopo/training/loop.py).
exec "$TORCHRUN" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  --log-dir "$node_logs" --redirects 3 --tee 3 \
  "$REPO/pretrain_amopo.py" "$@"
