"""Counter-based (stateless) standard normals for the AMoPO Gaussian weights.

A draw is a pure function of the key (seed, epoch, global sample id, pair, side), so
the same sample gets the same z whatever the micro-batch split, data-parallel size or
pipeline layout, and no generator state has to be checkpointed or synchronised.

Hashing is the splitmix64 finaliser (Steele, Lea & Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014) applied as a sponge over the key
fields, written in torch int64 arithmetic: int64 multiplication wraps modulo 2**64
(two's complement) on CPU and CUDA, which is exactly the unsigned product's bit
pattern; right shifts of int64 are arithmetic in torch, so logical shifts are
emulated by masking off the sign-extended bits.

Shapes (legend in docs/DESIGN.md): B samples in the batch, P pairs per sample, 2 sides (chosen, rejected).
"""

from __future__ import annotations

from typing import Optional

import torch

_MASK64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """Python int -> the signed int64 with the same low 64 bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, the splitmix64 increment
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)
_STREAM_U1, _STREAM_U2 = 0, 1  # the two independent uniforms of one Box-Muller draw


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijection of 64-bit words with full avalanche."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def hash_keys(*keys) -> torch.Tensor:
    """Hash broadcastable int64 key tensors (or Python ints) into one int64 word.

    Each field is mixed on its own before it is folded in, so that for a fixed prefix
    distinct values of the next field give distinct states (``mix64`` is a bijection).
    """
    tensors = [k for k in keys if isinstance(k, torch.Tensor)]
    device = tensors[0].device if tensors else None
    h = torch.zeros((), dtype=torch.int64, device=device)
    for k in keys:
        if not isinstance(k, torch.Tensor):
            k = torch.tensor(_as_int64(int(k)), dtype=torch.int64, device=device)
        h = mix64(h ^ mix64(k.to(torch.int64) + _GOLDEN))
    return h


def uniform_open01(h: torch.Tensor) -> torch.Tensor:
    """Top 52 bits of a hash -> float64 uniform in the open interval (0, 1).

    (m + 0.5) / 2**52 with m < 2**52 is exact in float64, so neither 0 (log(0) in
    Box-Muller) nor 1 can occur.
    """
    return (_shr(h, 12).to(torch.float64) + 0.5) * 2.0**-52


def counter_normals(
    seed: int,
    epoch: int,
    sample_ids: torch.Tensor,
    num_pairs: int,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals z_BP2 keyed by (seed, epoch, sample_ids[b], pair p, side s).

    ``sample_ids``: int [B] global sample ids. Returns [B, P, 2] in ``dtype`` on ``device``
    (default: the device of ``sample_ids``). Box-Muller (cosine branch) in float64.
    """
    if not isinstance(sample_ids, torch.Tensor) or sample_ids.dim() != 1:
        raise ValueError("counter_normals: sample_ids must be a 1-D integer tensor [B] of global sample ids")
    if sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
        raise ValueError(f"counter_normals: sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if num_pairs < 1:
        raise ValueError(f"counter_normals: num_pairs must be >= 1, got {num_pairs}")
    device = sample_ids.device if device is None else torch.device(device)
    ids_B11 = sample_ids.to(device=device, dtype=torch.int64).view(-1, 1, 1)
    pair_1P1 = torch.arange(num_pairs, dtype=torch.int64, device=device).view(1, -1, 1)
    side_112 = torch.arange(2, dtype=torch.int64, device=device).view(1, 1, -1)
    key_BP2 = hash_keys(seed, epoch, ids_B11, pair_1P1, side_112)
    u1_BP2 = uniform_open01(hash_keys(key_BP2, _STREAM_U1))
    u2_BP2 = uniform_open01(hash_keys(key_BP2, _STREAM_U2))
    z_BP2 = torch.sqrt(-2.0 * torch.log(u1_BP2)) * torch.cos(2.0 * torch.pi * u2_BP2)
    return z_BP2.to(dtype)
