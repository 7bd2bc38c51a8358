"""The process group and the TP1/PP1 model the converters work with."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_amopo.config import ParallelConfig
from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.runtime.comm import barrier, free_port, is_rank0


@contextlib.contextmanager
def single_process_distributed() -> Iterator[None]:
    """A one-rank gloo group with Megatron's parallel state at TP1/PP1 (dist_checkpointing needs both).

    Inside an existing group (tests, a training job) nothing is created or destroyed.
    """
    if dist.is_initialized():
        yield
        return
    from megatron_amopo.runtime.distributed import DistEnv, destroy_distributed, initialize_distributed

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    initialize_distributed(ParallelConfig(distributed_backend="gloo"), env)
    try:
        yield
    finally:
        destroy_distributed()


def build_full_model(arch: ModelArch, dtype: torch.dtype):
    """A TP1/PP1 ``GPTModel`` on the CPU, parameters left uninitialised (they are all overwritten).

    Local layer spec: Megatron-Core's dist checkpoints use the TE spec names for its
    norms, so the result loads into either spec.
    """
    from megatron.core import parallel_state as ps

    from megatron_amopo.model.provider import model_provider, transformer_config

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise RuntimeError(f"the converters build the full model: initialise Megatron at TP1/PP1, not TP{tp}/PP{pp}")
    config = transformer_config(
        arch,
        ParallelConfig(),
        params_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
    )
    return model_provider(arch, config, pre_process=True, post_process=True, use_te=False)


def check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"output directory {path} exists and is not empty; pass --overwrite to replace it")


def staging_dir(path: str) -> str:
    """The temporary sibling every rank writes into before ``publish`` renames it."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(os.path.abspath(path))}.partial")


def start_staging(path: str) -> str:
    tmp = staging_dir(path)
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    return tmp


def publish(path: str) -> None:
    """Move the finished staging directory to ``path`` (replacing it), on rank 0; collective."""
    barrier()
    if is_rank0():
        tmp, old = staging_dir(path), f"{staging_dir(path)}.old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
