"""CPU compatibility layer for Megatron-Core 0.16 (applied only when CUDA is absent).

Megatron-Core assumes a CUDA device in a handful of places. On a CPU-only machine
(development, CI) ``apply()`` makes those places use the CPU instead; with CUDA
present it does nothing, so GPU runs execute Megatron-Core unmodified. Each patch
names the Megatron-Core calls it serves:

1. ``torch.cuda.current_device()`` used as a device: rotary embeddings
   (``RotaryEmbedding.get_emb``), p2p shape exchange and receive buffers
   (``pipeline_parallel/p2p_communication.py``), TP gather buffers
   (``tensor_parallel/mappings.py``, ``layers.py``), optimizer scalars. It returns
   ``torch.device("cpu")`` here.
2. Tensors allocated with ``device="cuda"`` or moved with ``.cuda()`` / ``.to("cuda")``:
   token counters in ``schedules.py``, ``found_inf``/grad-norm scalars in
   ``optimizer.py`` and ``clip_grads.py``, the distributed optimizer's checkpoint
   gather, ``dist_checkpointing/exchange_utils.py``. A global
   ``TorchFunctionMode`` rewrites those device requests to the CPU.
3. Parameter type checks ``param.type() == "torch.cuda.FloatTensor"`` in
   ``optimizer.py`` / ``distrib_optimizer.py``: the same mode reports the CUDA type
   name for CPU floating tensors.
4. ``torch.cuda.synchronize`` / ``empty_cache``: no-ops.
5. The CUDA RNG states tracker (``tensor_parallel/random.py``): ``fork()``, ``add()``
   and activation recompute's get/set of the RNG state act on the CPU default
   generator, so dropout under ``get_cuda_rng_tracker().fork()`` and recompute
   replay work the same way they do on GPU.
6. ``WrappedTorchNorm`` refuses ``sequence_parallel``: it is built without the flag
   and its parameters are tagged ``sequence_parallel`` so that
   ``finalize_model_grads`` all-reduces their gradients over the TP group, exactly
   as Megatron does for TE/Apex norms.

Context parallelism needs TE attention and fused kernels (bias-activation,
bias-dropout, cross-entropy fusion, RoPE fusion, gradient-accumulation fusion)
need CUDA; ``megatron_amopo.model`` keeps them off on CPU rather than patching.
"""
from __future__ import annotations

import dataclasses
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
    # Seed the CPU default generator directly: torch.manual_seed itself calls
    # torch.cuda.manual_seed_all, which stays the (lazy, harmless) original.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__
    if getattr(original_new, "_amopo_cpu_compat", False):
        return

    def new(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        norm = original_new(cls, dataclasses.replace(config, sequence_parallel=False), *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    new._amopo_cpu_compat = True
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
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.empty_cache = lambda: None
        _patch_rng()
        _patch_torch_norm()
        # Entered for good on the calling (main) thread: the mode stack is
        # thread-local, and Megatron-Core issues these calls from the main thread.
        _CudaToCpuMode().__enter__()
        _APPLIED = True
    return True
