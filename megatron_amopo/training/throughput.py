"""Model FLOPs, MFU and peak memory: one definition for the trainer's log lines and the benchmarks.

Training FLOPs of a sequence of L positions (3 x forward; docs/GPU.md)::

    6 * N_mm * L  +  6 * layers * d_attn * L^2

N_mm: the matmul weights a token meets (QKV, attention output, the three MLP matrices of
every layer, and the LM head; not the embedding lookup). The second term: the causal
attention's score and value products (4 L^2 d_attn per layer forward, half under the mask).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch

from megatron_amopo.model.architectures import ModelArch

# Dense bf16 peak, TFLOP/s per GPU (SXM cards; the figure Megatron reports MFU against).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def matmul_params(arch: ModelArch) -> int:
    """N_mm: weights of the matmuls every token goes through (LM head included, embedding lookup not)."""
    h, d, heads, groups = arch.hidden_size, arch.kv_channels, arch.num_attention_heads, arch.num_query_groups
    per_layer = h * d * (heads + 2 * groups) + heads * d * h + 3 * h * arch.ffn_hidden_size
    return arch.num_layers * per_layer + h * arch.vocab_size


def training_flops(arch: ModelArch, lengths: Iterable[int]) -> float:
    """Forward + backward FLOPs of sequences with these position counts (module docstring)."""
    n_mm, attn = matmul_params(arch), arch.num_layers * arch.num_attention_heads * arch.kv_channels
    return float(sum(6 * n_mm * L + 6 * attn * L * L for L in (int(x) for x in lengths)))


def device_peak_tflops(override: Optional[float] = None) -> tuple[str, Optional[float]]:
    """(device name, dense bf16 peak TFLOP/s or None). None on CPU and on GPUs missing from
    ``PEAK_TFLOPS`` (PCIe cards included), unless ``override`` gives the peak."""
    if not torch.cuda.is_available():
        return "cpu", override
    name = torch.cuda.get_device_name()
    if override:
        return name, override
    return name, next((v for k, v in PEAK_TFLOPS.items() if k in name and "PCIe" not in name), None)


def peak_memory_bytes() -> int:
    """This process's peak: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mfu(flops: float, seconds: float, num_gpus: int, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation of ``num_gpus`` GPUs that did ``flops`` in ``seconds``; None without a peak."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (num_gpus * peak_tflops * 1e12)
