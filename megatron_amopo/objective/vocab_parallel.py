"""What the two vocab-parallel log-prob kernels share: token selection, label ownership, the
log-sum-exp all-reduce and the softmax gradient rows.

``logprobs.token_logprobs`` (from logits) and ``fused_logprobs.fused_token_logprobs`` (from hidden
states and the output weight) select the loss tokens, find which rank of the tensor-parallel group
owns each label, combine every rank's log-sum-exp share and form g * (onehot - softmax) in
backward with these functions. ``all_reduce_lse`` is their only communication; its process group
is an argument (``None``: a group of one). Algorithm and precision: docs/OBJECTIVE.md,
"Vocab-parallel log-probs".

Shape legend: T tokens, flattened (after ``select_tokens``: the selected tokens, in selection order),
V vocabulary entries on this rank, C tokens in one chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in ``group``; ``None`` is a group of one."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank in ``group``; 0 in the group of one (``None``)."""
    return 0 if group is None else dist.get_rank(group)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 stays fp64 (float64 gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_tokens(labels, mask, vocab_local: int, group, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat int64 labels [T], indices of the tokens where ``mask`` is non-zero), labels checked."""
    labels_T = labels.reshape(-1).to(torch.int64)
    if mask is None:
        idx_T = torch.arange(labels_T.numel(), device=labels_T.device)
    else:
        if mask.shape != labels.shape:
            raise ValueError(f"{who}: mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
        idx_T = mask.reshape(-1).nonzero().squeeze(1)
    _check_labels(labels_T[idx_T], vocab_local * group_size(group), group, who)
    return labels_T, idx_T


def _check_labels(labels_T: torch.Tensor, vocab_size: int, group, who: str) -> None:
    if labels_T.numel() and (labels_T.min() < 0 or labels_T.max() >= vocab_size):
        where = "the full vocabulary" if group_size(group) == 1 else "tensor-parallel size x vocabulary slice"
        raise ValueError(
            f"{who}: label ids must lie in [0, {vocab_size}) ({where}), got "
            f"[{int(labels_T.min())}, {int(labels_T.max())}]; was the data tokenised for another model?"
        )


def resolve_chunk_tokens(chunk_tokens: Optional[int], default: int, who: str) -> int:
    """``chunk_tokens``, or ``default`` when not given; at least 1."""
    chunk = chunk_tokens if chunk_tokens is not None else default
    if chunk < 1:
        raise ValueError(f"{who}: chunk_tokens must be >= 1, got {chunk}")
    return chunk


def scatter_selected(logp_sel_T: torch.Tensor, idx_T: torch.Tensor, shape) -> torch.Tensor:
    """Selected tokens' log-probs back into the full layout; the others are 0 (and pass no gradient)."""
    return logp_sel_T.new_zeros(torch.Size(shape).numel()).index_put((idx_T,), logp_sel_T).view(shape)


def owned_labels(labels_T: torch.Tensor, vocab_start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index within this rank's slice, clamped to be valid; whether this rank owns it)."""
    local_T = labels_T - vocab_start
    owned_T = (local_T >= 0) & (local_T < vocab_local)
    return torch.where(owned_T, local_T, torch.zeros_like(local_T)), owned_T


def all_reduce_lse(lse_local_T, target_T, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global log-sum-exp and label logit from every rank's share (Megatron's two all-reduces):
    lse = M + log sum_r exp(lse_r - M) with M the MAX over ranks; the label logit is a SUM
    to which only the owning rank contributes."""
    max_T = lse_local_T.clone()
    dist.all_reduce(max_T, op=dist.ReduceOp.MAX, group=group)
    sums_2T = torch.stack([torch.exp(lse_local_T - max_T), target_T])
    dist.all_reduce(sums_2T, op=dist.ReduceOp.SUM, group=group)
    return max_T + torch.log(sums_2T[0]), sums_2T[1]


def split_lse(lse_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 log-sum-exp -> (hi, lo) in ``dtype`` with hi + lo = lse to fp64 precision.

    Backward forms exp(x - hi) * exp(-lo): x - hi is exact for the entries near the
    log-sum-exp (Sterbenz), which carry the probability mass, so the gradient keeps
    the precision of a softmax computed from the row maximum.
    """
    hi_T = lse_T.to(dtype)
    return hi_T, (lse_T - hi_T.to(lse_T.dtype)).to(dtype)


def softmax_grad_scales(grad_T, lse_lo_T, owned_T) -> tuple[torch.Tensor, torch.Tensor]:
    """(-g exp(-lo), g where this rank owns the label): the factors of g * (onehot - softmax)."""
    grad_T = grad_T.to(lse_lo_T.dtype)
    scale_T = -grad_T * torch.exp(-lse_lo_T)  # softmax = exp(x - hi) * exp(-lo)
    return scale_T, torch.where(owned_T, grad_T, torch.zeros_like(grad_T))


def softmax_grad_rows(x_CV, sl: slice, lse_hi_T, label_T, scales, out=None) -> torch.Tensor:
    """g * (onehot(label) - softmax) of one chunk, the softmax from the saved global log-sum-exp:
    no max or sum passes, and every pass after the first runs on a cache-resident chunk. ``out``
    (the compute dtype) receives the rows; without it they are a new tensor in the compute dtype."""
    scale_T, onehot_grad_T = scales
    rows_CV = torch.sub(x_CV, lse_hi_T[sl, None], out=out)
    rows_CV.exp_().mul_(scale_T[sl, None])
    return rows_CV.scatter_add_(1, label_T[sl, None], onehot_grad_T[sl, None])
