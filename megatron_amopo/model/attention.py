"""Core attention for the local layer spec through PyTorch's ``scaled_dot_product_attention``.

A drop-in for Megatron-Core's ``DotProductAttention`` where TE is absent: no stored score matrix,
Megatron's mask convention (bool, True = masked), and packed THD input attended per sequence
(variable-length flash attention on CUDA). See docs/DESIGN.md, "Attention without TE".

Megatron's argument names: sq/sk query/key positions, b rows, np query heads and ng query groups on
this tensor-parallel rank, hn head size, t packed tokens. Tensor suffixes follow the package legend
(docs/DESIGN.md): R rows, S positions, T tokens of a THD stream, A query heads, Q query groups, d head size.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Megatron ``core_attention`` submodule computed with ``F.scaled_dot_product_attention``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"SDPAttention supports attention_dropout=0 only, got {dropout}; this project trains without "
                "attention dropout (set attention_dropout=0.0 in the TransformerConfig)"
            )
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention (the TE layer spec)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if config.window_size is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention (window_size)")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        # Megatron's query-key layer scaling divides the scale by layer_number and multiplies the
        # scores back inside the softmax: the net scale is the plain one, which is what SDPA gets.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, hp] (THD: [t, *, hn] -> [t, hp])."""
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            raise ValueError(
                f"SDPAttention takes packed_seq_params only in 'thd' format, got {packed_seq_params.qkv_format!r}"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, np_, hn = query.shape
        q_RASd, k_RQSd, v_RQSd = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is not None:
            # The memory-efficient kernel takes an explicit mask but not GQA: expand the groups
            # (what the unfused path does too). SDPA's bool mask is True = attend.
            k_RASd, v_RASd = self._expand_groups(k_RQSd, v_RQSd, np_)
            out_RASd = F.scaled_dot_product_attention(
                q_RASd, k_RASd, v_RASd, attn_mask=~attention_mask, scale=self.softmax_scale
            )
        else:
            causal = mask_type == AttnMaskType.causal and sq > 1
            out_RASd = F.scaled_dot_product_attention(
                q_RASd,
                k_RQSd,
                v_RQSd,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k_RQSd.shape[1] != np_,
            )
        return out_RASd.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    @staticmethod
    def _expand_groups(k_RQSd: torch.Tensor, v_RQSd: torch.Tensor, heads: int):
        groups = k_RQSd.shape[1]
        if heads % groups:
            raise ValueError(f"{heads} query heads are not a multiple of {groups} key/value groups")
        if groups == heads:
            return k_RQSd, v_RQSd
        rep = heads // groups  # head h uses group h // rep (Megatron's repeat_interleave order)
        return k_RQSd.repeat_interleave(rep, dim=1), v_RQSd.repeat_interleave(rep, dim=1)

    def _forward_thd(self, query, key, value, params) -> torch.Tensor:
        """Causal attention within each packed sequence; q [t, np, hn] (or [t, 1, np, hn])."""
        q_TAd, k_TQd, v_TQd = (x.reshape(x.shape[0], x.shape[-2], x.shape[-1]) for x in (query, key, value))
        cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
            raise ValueError("SDPAttention THD: self-attention needs cu_seqlens_kv == cu_seqlens_q")
        varlen = varlen_causal_attention() if _flash_eligible(q_TAd) else None
        if varlen is not None and params.max_seqlen_q is not None:
            # cu_seqlens were checked where they were built (data/batch.py): no host sync here.
            out_TAd = varlen(q_TAd, k_TQd, v_TQd, cu_q.to(torch.int32), int(params.max_seqlen_q), self.softmax_scale)
            return out_TAd.reshape(q_TAd.shape[0], -1)
        return self._thd_per_sequence(q_TAd, k_TQd, v_TQd, cu_q)

    def _thd_per_sequence(self, q_TAd, k_TQd, v_TQd, cu_q) -> torch.Tensor:
        """One causal SDPA call per packed sequence (any device)."""
        bounds = cu_q.tolist()
        if bounds[0] != 0 or bounds[-1] != q_TAd.shape[0]:
            raise ValueError(
                f"SDPAttention THD: cu_seqlens_q must run from 0 to the {q_TAd.shape[0]} packed "
                f"tokens, got {bounds[0]}..{bounds[-1]}"
            )
        heads = q_TAd.shape[1]
        pieces = []
        for a, e in zip(bounds[:-1], bounds[1:]):
            if e < a:
                raise ValueError(f"SDPAttention THD: cu_seqlens_q must not decrease, got {bounds}")
            if e == a:
                continue
            q, k, v = (x[a:e].transpose(0, 1)[None] for x in (q_TAd, k_TQd, v_TQd))
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=e - a > 1, scale=self.softmax_scale, enable_gqa=k.shape[1] != heads
            )
            pieces.append(o[0].transpose(0, 1))
        return torch.cat(pieces).reshape(q_TAd.shape[0], -1)


def flash_head_size_ok(hn: int) -> bool:
    return hn > 0 and hn % 8 == 0 and hn <= 256


def _flash_eligible(q_TAd: torch.Tensor) -> bool:
    """Flash attention's limits: CUDA, fp16/bf16, head size a multiple of 8 up to 256."""
    return q_TAd.is_cuda and q_TAd.dtype in (torch.float16, torch.bfloat16) and flash_head_size_ok(q_TAd.shape[-1])


@functools.lru_cache(maxsize=1)
def varlen_causal_attention():
    """``f(q [t, np, hn], k/v [t, ng, hn], cu_seqlens int32, max_seqlen, scale) -> [t, np, hn]``:
    causal attention within each sequence through ``torch.nn.attention.varlen.varlen_attn``
    (flash attention, CUDA), or None when this torch has no such function.

    The function's keywords changed across torch releases (causality as ``is_causal`` or as
    ``window_size=(-1, 0)``; ``scale`` and ``enable_gqa`` are newer), so they are read from its
    signature: missing GQA support expands the key/value groups, a missing ``scale`` is folded
    into q.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal: dict[str, Any]  # keywords of this torch release's varlen_attn, read from its signature
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    has_scale, has_gqa = "scale" in params, "enable_gqa" in params

    def attend(q_TAd, k_TQd, v_TQd, cu_K, max_seqlen: int, scale: float):
        heads, groups = q_TAd.shape[1], k_TQd.shape[1]
        kwargs = dict(causal)
        if groups != heads:
            if has_gqa:
                kwargs["enable_gqa"] = True
            else:  # Megatron's order: head h uses group h // (heads // groups)
                k_TQd = k_TQd.repeat_interleave(heads // groups, dim=1)
                v_TQd = v_TQd.repeat_interleave(heads // groups, dim=1)
        if has_scale:
            kwargs["scale"] = scale
        else:
            q_TAd = q_TAd * (scale * math.sqrt(q_TAd.shape[-1]))
        return varlen_attn(q_TAd, k_TQd, v_TQd, cu_K, cu_K, max_seqlen, max_seqlen, **kwargs)

    return attend
