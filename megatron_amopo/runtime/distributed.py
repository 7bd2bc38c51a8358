"""Distributed start-up: torchrun environment -> process group -> Megatron parallel groups.

With CUDA the default group is device-aware, ``cpu:gloo,cuda:nccl``: torch routes each
collective by its tensor's device, so the hot path runs on NCCL while the few host-side
reductions (step metrics, stop agreement, object collectives) run on gloo. Without CUDA
everything is gloo. The CPU compatibility layer is applied here (and only when CUDA is
absent) before any Megatron-Core object is built. docs/DESIGN.md lists every collective.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_amopo.config import ParallelConfig
from megatron_amopo.runtime import cpu_compat


@dataclass(frozen=True)
class DistEnv:
    """What torchrun put in the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Optional[dict] = None) -> DistEnv:
        env = os.environ if environ is None else environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing and env.get("WORLD_SIZE", "1") != "1":
            raise RuntimeError(f"torchrun environment incomplete (missing {missing}); launch with torchrun or set them")
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )


CUDA_BACKEND = "cpu:gloo,cuda:nccl"


def process_group_backend(requested: Optional[str], cuda: Optional[bool] = None) -> str:
    """The ``init_process_group`` backend for ``--distributed-backend`` (None: the default).

    nccl (also the default with CUDA) gets a gloo companion for CPU tensors; gloo stays
    plain gloo. ``cuda`` defaults to ``torch.cuda.is_available()``.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "gloo":
        return "gloo"
    if cuda:
        return CUDA_BACKEND
    if requested == "nccl":
        raise ValueError(
            "--distributed-backend nccl needs CUDA GPUs, and none is visible; "
            "drop the flag (gloo on CPU) or run on GPUs"
        )
    return "gloo"


def initialize_distributed(parallel: ParallelConfig, env: Optional[DistEnv] = None) -> DistEnv:
    """Create the default process group and Megatron's TP/PP/CP/DP groups.

    Idempotent for the default group (a test harness may have created it).
    """
    env = env or DistEnv.from_environ()
    parallel.data_parallel_size(env.world_size)  # raises on an impossible layout, before any work
    backend = process_group_backend(parallel.distributed_backend)
    if parallel.context_parallel_size > 1 and not torch.cuda.is_available():
        raise ValueError(
            "--context-parallel-size > 1 needs Transformer Engine attention on CUDA GPUs; "
            "use --context-parallel-size 1 on CPU"
        )
    cpu_compat.apply()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # Megatron's gloo twins of the DP groups, used by the distributed optimizer's
        # DP-gather of its state; the other groups inherit the default group's backend.
        create_gloo_process_groups=True,
    )
    return env


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker.

    Call after ``initialize_distributed``. Following Megatron, the default stream
    is offset by the pipeline rank (different layers draw differently) while the
    tracker's model-parallel stream is offset by the TP rank.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
