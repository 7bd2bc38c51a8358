"""Build this rank's model chunk wrapped in Megatron DDP, with the config wiring
Megatron-Core's schedules rely on.

Forgetting ``config.finalize_model_grads_func`` makes Megatron DDP skip the
data-parallel gradient reduction (and the sequence-parallel norm and tied-embedding
reductions) without any warning, so the wiring lives here, next to the model, and
``check_wiring`` lets the training step refuse an unwired config.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.model.provider import build_model_stage


def wire_model_config(config, model_chunks: list) -> None:
    """Hook gradient synchronisation into the config that the schedules read."""
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def check_wiring(config) -> None:
    if getattr(config, "finalize_model_grads_func", None) is None or getattr(config, "no_sync_func", None) is None:
        raise RuntimeError(
            "model config has no finalize_model_grads_func/no_sync_func: data-parallel gradients would never be "
            "reduced; build the model with megatron_amopo.model.build.build_model (or call wire_model_config)"
        )


def build_model(
    arch: ModelArch,
    config,
    *,
    use_distributed_optimizer: bool = False,
    use_te: Optional[bool] = None,
) -> list:
    """This rank's stage as a one-element list of Megatron ``DistributedDataParallel`` chunks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    stage = build_model_stage(arch, config, use_te)
    if config.bf16:
        # Megatron-LM's Float16Module convention: every parameter in bf16, norms included
        # (the local spec builds torch norms in fp32, which then take the unfused path);
        # the mixed-precision optimizer keeps fp32 main parameters.
        stage.to(torch.bfloat16)
    if torch.cuda.is_available():
        stage.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    chunk = DistributedDataParallel(config=config, ddp_config=ddp_config, module=stage)
    chunks = [chunk]
    wire_model_config(config, chunks)
    return chunks
