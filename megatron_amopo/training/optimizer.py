"""Megatron optimizer and learning-rate schedule, with fixes for megatron-core's torch-AdamW fallback.

Without TE or Apex, megatron-core 0.16.1 uses ``torch.optim.AdamW``: a resume shares one ``step``
tensor between parameters, resharded loads fail on a fresh optimizer, and the default ``foreach``
kernels are slow. Each fix is a function below; docs/DESIGN.md, "Optimizer fixes", says why.
"""

from __future__ import annotations

import math

import torch

from megatron_amopo.config import OptimizerConfig, TrainingConfig


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", None)
    optimizers = chained if chained is not None else [optimizer]
    return [o.optimizer for o in optimizers if getattr(o, "optimizer", None) is not None]


def _is_torch_adamw(opt: torch.optim.Optimizer) -> bool:
    return type(opt) is torch.optim.AdamW


def untie_adam_steps(optimizer) -> int:
    """Give each parameter's AdamW state its own ``step`` tensor (fix 1); returns how many."""
    fixed = 0
    for opt in _torch_optimizers(optimizer):
        if not _is_torch_adamw(opt):
            continue
        for state in opt.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().clone()
                fixed += 1
    return fixed


def use_fused_adamw(optimizer) -> int:
    """Run every torch AdamW of ``optimizer`` with ``fused=True``; returns how many param groups.

    Also applied after a checkpoint load (the loaded param groups carry the saved flags).
    Fused AdamW keeps ``step`` as a float32 tensor on the parameter's device.
    """
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    switched = 0
    for opt in _torch_optimizers(optimizer):
        if not _is_torch_adamw(opt):
            continue
        for group in opt.param_groups:
            params = group["params"]
            if group.get("differentiable") or not all(
                p.device.type in supported and p.is_floating_point() for p in params
            ):
                continue
            group["fused"], group["foreach"] = True, False
            switched += 1
            for p in params:
                step = opt.state.get(p, {}).get("step")
                if torch.is_tensor(step) and (step.device != p.device or step.dtype != torch.float32):
                    opt.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
    return switched


def _extend_init_state_fn(megatron_opt) -> None:
    """Fix 2: the state initialiser also creates AdamW's ``step``."""
    original = getattr(megatron_opt, "init_state_fn", None)
    if original is None or getattr(original, "_amopo_adds_step", False):
        return

    def init_state_fn(opt, config=None):
        original(opt, config)
        if _is_torch_adamw(opt):
            for group in opt.param_groups:
                fused = group.get("fused")  # fused AdamW wants the step on the parameter's device
                for p in group["params"]:
                    opt.state[p].setdefault(
                        "step", torch.tensor(0.0, dtype=torch.float32, device=p.device if fused else None)
                    )

    init_state_fn._amopo_adds_step = True  # type: ignore[attr-defined]
    megatron_opt.init_state_fn = init_state_fn


def _keep_step_on_reshard(dist_opt) -> None:
    """Fix 2, second half: ``step`` is not among the resharded per-parameter tensors."""
    original = dist_opt._set_main_param_and_optimizer_states
    if getattr(original, "_amopo_keeps_step", False):
        return

    def set_states(model_param, tensors):
        group_index, group_order = dist_opt.model_param_group_index_map[model_param]
        main_param = dist_opt.optimizer.param_groups[group_index]["params"][group_order]
        state = dist_opt.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"].detach().clone()}
        return original(model_param, tensors)

    set_states._amopo_keeps_step = True  # type: ignore[attr-defined]
    dist_opt._set_main_param_and_optimizer_states = set_states


def build_optimizer(model_chunks: list, opt_cfg: OptimizerConfig, train_cfg: TrainingConfig):
    from megatron.core.optimizer import OptimizerConfig as MCOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    mc = MCOptimizerConfig(
        optimizer="adam",
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        bf16=train_cfg.bf16,
        params_dtype=torch.bfloat16 if train_cfg.bf16 else torch.float32,
        use_distributed_optimizer=train_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(mc, model_chunks)
    use_fused_adamw(optimizer)
    from megatron.core.optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        _extend_init_state_fn(sub)
        if isinstance(sub, DistributedOptimizer) and _is_torch_adamw(sub.optimizer):
            _keep_step_on_reshard(sub)
    return optimizer


def optimizer_load_request(optimizer, model_sharded_state_dict: dict, metadata: dict) -> dict:
    """The sharded optimizer state dict to pass to ``dist_checkpointing.load`` (fix 2)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "init_state_fn", None) is not None and getattr(sub, "optimizer", None) is not None:
            _extend_init_state_fn(sub)
            sub.init_state_fn(sub.optimizer, getattr(sub, "config", None))
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=True, metadata=metadata)


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` followed by fix 1 (and fused AdamW again)."""
    optimizer.load_state_dict(state_dict)
    untie_adam_steps(optimizer)
    use_fused_adamw(optimizer)


def build_scheduler(optimizer, opt_cfg: OptimizerConfig, train_iters: int, global_batch_size: int):
    """Megatron's OptimizerParamScheduler, stepped in samples like Megatron-LM."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup_steps = int(math.floor(opt_cfg.lr_warmup_fraction * train_iters))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_steps else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        lr_warmup_steps=warmup_steps * global_batch_size,
        lr_decay_steps=max(train_iters * global_batch_size, 1),
        lr_decay_style=opt_cfg.lr_decay_style,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=max(train_iters * global_batch_size, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
