"""Move Megatron-Core tensors between the full (TP1, PP1) layout and one rank's shard.

"Full" names are the names of a TP1/PP1 ``GPTModel`` state dict (global layer
indices). A rank's local name has stage-local layer indices. The TP split of each
parameter follows the attributes Megatron-Core sets on it (``tensor_model_parallel``,
``partition_dim``) with one exception: a gated ``linear_fc1`` holds
``[gate chunk r; up chunk r]`` on TP rank r, not chunk r of ``[gate; up]``.
``linear_qkv`` needs no special case: its rows are already grouped per query group
([q heads; k; v] per group), so chunk r is rank r's block of groups.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_LAYER_RE = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def unwrap(module: torch.nn.Module) -> Any:
    """The Megatron module inside DDP / Float16Module wrappers (typed Any: its attributes are Megatron's)."""
    inner: Any = module
    while hasattr(inner, "module"):
        inner = inner.module
    return inner


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this stage's first transformer layer."""
    layers = getattr(unwrap(model).decoder, "layers", [])
    return layers[0].layer_number - 1 if len(layers) else 0


def full_name(local_name: str, offset: int) -> str:
    m = _LAYER_RE.match(local_name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else local_name


def is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def tp_split_dim(param: torch.Tensor) -> int | None:
    """The dimension a parameter is split on across TP ranks, or None if replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)  # type: ignore[attr-defined]  # set by Megatron on TP-split parameters
    return None


def shard_tensor(full: torch.Tensor, name: str, dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``tp_rank``'s piece of ``full``."""
    if dim is None or tp_size == 1:
        return full
    if is_gated_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard_tensor(pieces: list[torch.Tensor], name: str, dim: int | None) -> torch.Tensor:
    """Inverse of ``shard_tensor`` given all TP ranks' pieces in rank order."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if is_gated_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in pieces))
        return torch.cat([torch.cat(gates, dim=0), torch.cat(ups, dim=0)], dim=0)
    return torch.cat(pieces, dim=dim)


def local_parameters(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """(local name, full name, parameter) for every parameter of a model stage."""
    inner = unwrap(model)
    offset = layer_offset(inner)
    for name, param in inner.named_parameters():
        yield name, full_name(name, offset), param


@torch.no_grad()
def load_full_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Copy this rank's shard of ``full_state`` into ``model``'s parameters.

    A tied ``output_layer.weight`` on the last stage (PP > 1) takes the embedding.
    """
    for local, full, param in local_parameters(model):
        source = full
        if source not in full_state and source == "output_layer.weight":
            source = "embedding.word_embeddings.weight"
        if source not in full_state:
            raise KeyError(f"parameter {full} (local {local}) has no tensor in the full state")
        piece = shard_tensor(full_state[source], full, tp_split_dim(param), tp_rank, tp_size)
        if piece.shape != param.shape:
            raise ValueError(f"{full}: shard shape {tuple(piece.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(piece)


def gather_full(
    tensors: dict[str, tuple[torch.Tensor, int | None]],
    tp_group: dist.ProcessGroup,
    mp_group: dist.ProcessGroup,
) -> dict[str, torch.Tensor]:
    """Reassemble full tensors from every TP/PP rank of one model replica.

    ``tensors`` maps full names to (local piece, TP split dim) on each rank. Uses
    object collectives (gloo-friendly, meant for tests and tools, not hot paths).
    The result is the same on all ranks of ``mp_group``.
    """
    tp_rank = dist.get_rank(tp_group)
    payload = {name: (tp_rank, dim, t.detach().cpu()) for name, (t, dim) in tensors.items()}
    everyone: list = [None] * dist.get_world_size(mp_group)
    dist.all_gather_object(everyone, payload, group=mp_group)
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for part in everyone:
        for name, (rank, dim, t) in part.items():
            pieces.setdefault(name, {})[rank] = t
            dims[name] = dim
    return {
        name: unshard_tensor([by_rank[r] for r in sorted(by_rank)], name, dims[name])
        for name, by_rank in pieces.items()
    }
