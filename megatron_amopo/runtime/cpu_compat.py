"""CPU compatibility layer for Megatron-Core 0.16, applied only when CUDA is absent.

Megatron-Core assumes a CUDA device in a handful of places; ``apply()`` points them at the CPU
and does nothing when CUDA is present. Each patch below names the Megatron-Core calls it serves;
docs/DESIGN.md, "The CPU compatibility layer", has the list.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU (patches 2 and 3)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None and args[0].device.type == "cpu":
                return name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA driver
        return func(*args, **kwargs)


def is_applied() -> bool:
    return _APPLIED


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mc_random._get_cuda_rng_state = get_state
    mc_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)

    def manual_seed(seed: int) -> None:
        # Seed the CPU default generator directly: torch.manual_seed itself calls
        # torch.cuda.manual_seed_all, which stays the (lazy, harmless) original.
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.manual_seed = manual_seed


def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if original_new.__module__ == __name__:  # patched already: ``new`` below is defined here
        return

    def new(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        # A shallow copy, not dataclasses.replace: re-running TransformerConfig's validation would reject
        # flags set after construction (variable_seq_lengths under PP, training/run.py).
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original_new(cls, plain, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


def apply() -> bool:
    """Apply the CPU patches once per process if CUDA is unavailable.

    Returns True when the patches are (now) in place, False when CUDA is available
    and nothing was changed.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        # torch declares an int (a CUDA index); Megatron passes the result on as a device, here the CPU
        torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment,return-value]
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.empty_cache = lambda: None
        _patch_rng()
        _patch_torch_norm()
        # Entered for good on the calling (main) thread: the mode stack is
        # thread-local, and Megatron-Core issues these calls from the main thread.
        _CudaToCpuMode().__enter__()
        _APPLIED = True
    return True
