"""Rank helpers shared by training, evaluation, checkpoints and conversion.

Each works with or without an initialised default group (a single process
without torchrun counts as rank 0 of one).
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    """True on global rank 0, and in a process without a default group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(msg: str) -> None:
    """Print ``msg`` on global rank 0 only (flushed: ranks' output interleaves under torchrun)."""
    if is_rank0():
        print(msg, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on one, so that all ranks take the same branch.

    The flag travels as a CPU tensor: the default group routes it to its CPU backend (gloo).
    """
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
