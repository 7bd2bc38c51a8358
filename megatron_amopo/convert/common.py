"""Shared pieces of the Hugging Face <-> Megatron-Core mapping tables.

A table row maps one parameter of a TP1/PP1 ``GPTModel`` (local layer spec names,
``{i}`` = global layer index) to one or more Hugging Face tensors through a named
transform. Every HF tensor carries its shape in symbols resolved from the
``ModelArch`` so that a checkpoint can be validated from its header alone.

Weight-shape symbols (the package legend, docs/DESIGN.md): V vocabulary, H hidden, F FFN hidden, Ad = query
heads x head size, Qd = query groups x head size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_amopo.model.architectures import ModelArch

# Megatron-Core's TE layer spec fuses the pre-attention / pre-MLP RMSNorm into the
# following linear layer; the local spec keeps separate modules. Dist checkpoints
# use the TE names for both specs (TransformerLayer's sharded_state_dict maps the
# local names, megatron-core 0.16.1), so only in-memory parameter names differ.
TE_SPEC_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class Row:
    """One Megatron parameter <- one or more HF tensors.

    ``hf`` lists (name template, shape symbols); ``transform`` names an entry of
    ``TRANSFORMS``; ``untied_only`` rows exist only without tied embeddings.
    """

    megatron: str
    hf: tuple[tuple[str, tuple[str, ...]], ...]
    transform: str = "identity"
    untied_only: bool = False

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron


@dataclass(frozen=True)
class Entry:
    """A ``Row`` resolved for one layer and one architecture."""

    megatron: str
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    transform: str


def shape_symbols(arch: ModelArch) -> dict[str, int]:
    d, g = arch.kv_channels, arch.num_query_groups
    return dict(
        V=arch.vocab_size, H=arch.hidden_size, F=arch.ffn_hidden_size, Ad=arch.num_attention_heads * d, Qd=g * d
    )


def expand(table: Sequence[Row], arch: ModelArch) -> list[Entry]:
    """The concrete entries of ``table`` for ``arch``, in HF checkpoint order."""
    sym = shape_symbols(arch)
    rows = [r for r in table if not (r.untied_only and arch.tie_word_embeddings)]
    out: list[Entry] = []

    def add(row: Row, **fmt) -> None:
        names = tuple(n.format(**fmt) for n, _ in row.hf)
        shapes = tuple(tuple(sym[s] for s in shp) for _, shp in row.hf)
        out.append(Entry(row.megatron.format(**fmt), names, shapes, row.transform))

    # Table order is HF order: rows before the first per-layer row, the layers, the rest.
    first = next(k for k, r in enumerate(rows) if r.per_layer)
    for row in rows[:first]:
        add(row)
    for i in range(arch.num_layers):
        for row in rows:
            if row.per_layer:
                add(row, i=i)
    for row in rows[first:]:
        if not row.per_layer:
            add(row)
    return out


# ---------------------------------------------------------------------------
# Transforms: to_megatron(hf tensors, arch) -> tensor; to_hf(tensor, arch) -> tensors


def _qkv_interleave(tensors: Sequence[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """[q; k; v] (HF, heads stacked) -> rows grouped per query group: [q_g (A/Q heads x d); k_g (d); v_g (d)]
    for each of the Q groups.

    This is Megatron-Core's fused QKV layout (SelfAttention.get_query_key_value_tensors
    splits each group's block into A/Q query heads, one key, one value)."""
    q, k, v = tensors
    g, d = arch.num_query_groups, arch.kv_channels
    tail = q.shape[1:]
    q_Q = q.reshape(g, -1, *tail)
    k_Q, v_Q = k.reshape(g, d, *tail), v.reshape(g, d, *tail)
    return torch.cat([q_Q, k_Q, v_Q], dim=1).reshape(-1, *tail)


def _qkv_split(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    g, d = arch.num_query_groups, arch.kv_channels
    h = arch.num_attention_heads // g
    tail = qkv.shape[1:]
    per_group = qkv.reshape(g, (h + 2) * d, *tail)
    q, k, v = per_group.split([h * d, d, d], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def _gate_up_concat(tensors: Sequence[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """SwiGLU fc1 at TP1 is [gate; up] (Megatron's glu splits its output in two halves)."""
    gate, up = tensors
    return torch.cat([gate, up], dim=0)


def _gate_up_split(fc1: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    return tuple(fc1.chunk(2, dim=0))


@dataclass(frozen=True)
class Transform:
    to_megatron: Callable[[Sequence[torch.Tensor], ModelArch], torch.Tensor]
    to_hf: Callable[[torch.Tensor, ModelArch], tuple[torch.Tensor, ...]]


TRANSFORMS = {
    "identity": Transform(lambda ts, arch: ts[0], lambda t, arch: (t,)),
    "qkv": Transform(_qkv_interleave, _qkv_split),
    "gate_up": Transform(_gate_up_concat, _gate_up_split),
}


def resolve_param_name(name: str, param_names) -> str:
    """``name`` (local spec) or its TE spec alias, whichever the model has."""
    if name in param_names:
        return name
    for local, te in TE_SPEC_ALIASES.items():
        if name.endswith(local):
            alias = name[: -len(local)] + te
            if alias in param_names:
                return alias
    raise KeyError(f"the Megatron model has no parameter {name!r} (nor its Transformer Engine spec name)")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_dtype(hf_config: dict) -> torch.dtype:
    """The dtype a HF config declares (``dtype`` in transformers 5.x, ``torch_dtype`` before); fp32 if none."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} in config.json (supported: {', '.join(_DTYPES)})")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]
