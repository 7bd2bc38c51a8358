"""Vocab-parallel token log-probs and per-sequence statistics: the objective's communication.

``token_logprobs`` turns each tensor-parallel rank's vocabulary slice of the logits into
log p(label) without gathering the vocabulary (as Megatron-Core's ``tensor_parallel/cross_entropy.py``),
chunk by chunk and only for loss tokens; ``sequence_stats`` sums them per sequence (all-reduced over
context parallelism). With ``vocab_parallel.py`` (the tensor-parallel log-sum-exp all-reduce, shared
with ``fused_logprobs.py``) and ``training/step.py`` the only code of the objective path that talks
to other ranks; every process group is an argument (``None``: a group of one). Algorithm and
precision: docs/OBJECTIVE.md, "Vocab-parallel log-probs".

Shape legend: T tokens, flattened; V vocabulary entries on this rank; C tokens in one chunk; N
sequences of the micro-batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_amopo.objective.amopo import SequenceStats
from megatron_amopo.objective.vocab_parallel import (
    all_reduce_lse,
    compute_dtype,
    group_rank,
    group_size,
    owned_labels,
    resolve_chunk_tokens,
    scatter_selected,
    select_tokens,
    softmax_grad_rows,
    softmax_grad_scales,
    split_lse,
)

# Budget of the fp32 [C, V] work buffer, far below the logits of any real micro-batch.
# CPU: 4 MiB stays in the last-level cache between the passes over a chunk; GPU: 2 GiB keeps
# kernel launches few (measurements in docs/OBJECTIVE.md and docs/GPU.md).
DEFAULT_CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 2 * 2**30}


def default_chunk_tokens(vocab_local: int, device: torch.device) -> int:
    budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * max(vocab_local, 1)))


def _pieces(idx_T: torch.Tensor, chunk_tokens: int) -> list[tuple[int, int, int]]:
    """Runs of consecutive selected tokens, cut to at most ``chunk_tokens``: (first, end, offset).

    Tokens [first, end) of the flattened logits are selected tokens offset .. offset +
    end - first in selection order. Slices of runs are views: no gathered copy of the
    logits is ever made.
    """
    if idx_T.numel() == 0:
        return []
    breaks = ((idx_T[1:] - idx_T[:-1]) != 1).nonzero().squeeze(1) + 1
    firsts = torch.cat([idx_T[:1], idx_T[breaks]]).tolist()
    lasts = torch.cat([idx_T[breaks - 1], idx_T[-1:]]).tolist()
    pieces, offset = [], 0
    for first, last in zip(firsts, lasts):
        for a in range(first, last + 1, chunk_tokens):
            b = min(a + chunk_tokens, last + 1)
            pieces.append((a, b, offset))
            offset += b - a
    return pieces


def _zero_gaps(grad_TV: torch.Tensor, pieces: list[tuple[int, int, int]]) -> None:
    """Zero the rows of ``grad_TV`` that no piece covers (tokens outside the loss)."""
    end = 0
    for a, b, _ in pieces:
        if a > end:
            grad_TV[end:a].zero_()
        end = b
    if end < grad_TV.shape[0]:
        grad_TV[end:].zero_()


def _local_lse(logits_TV, target_T, pieces, chunk_tokens: int, dtype, work_CV=None) -> torch.Tensor:
    """fp64 log-sum-exp of this rank's vocabulary slice for every selected token.

    ``work_CV``: the CPU path's [C, V] buffer in ``dtype`` (may be the chunk itself when the caller
    no longer needs its values); allocated when not given."""
    lse_T = target_T.new_empty(target_T.numel())
    if logits_TV.is_cuda:
        # GPU: memory traffic decides; the fused log-softmax reads a chunk twice and writes it
        # once. lse = x_j - log_softmax(x)_j for any j; j = the row's maximum, where
        # log_softmax is nearest 0 and so has the smallest absolute rounding error.
        for a, b, o in pieces:
            x_CV = logits_TV[a:b]
            m_C, j_C = torch.max(x_CV, dim=1)
            lsm_C = torch.log_softmax(x_CV, dim=1, dtype=dtype).gather(1, j_C[:, None]).squeeze(1)
            lse_T[o : o + b - a] = m_C.double() - lsm_C.double()
        return lse_T
    max_T = logits_TV.new_empty(target_T.numel())  # the logits' dtype: amax writes it directly
    sumexp_T = logits_TV.new_empty(target_T.numel(), dtype=dtype)
    if work_CV is None:
        work_CV = logits_TV.new_empty(min(chunk_tokens, target_T.numel()), logits_TV.shape[1], dtype=dtype)
    for a, b, o in pieces:
        sl, x_CV = slice(o, o + b - a), logits_TV[a:b]
        # CPU: lse_r = m + log sum exp(x - m): one read of the chunk from memory (amax), the
        # rest on the cache-resident chunk in one reused fp32 buffer.
        m_C = torch.amax(x_CV, dim=1, out=max_T[sl])
        shifted_CV = torch.sub(x_CV, m_C[:, None].to(dtype), out=work_CV[: b - a])
        torch.sum(shifted_CV.exp_(), dim=1, out=sumexp_T[sl])
    return torch.add(max_T.double(), sumexp_T.double().log(), out=lse_T)


class _VocabParallelLogprobs(torch.autograd.Function):
    """log p(label) of the selected tokens from vocab-sharded logits (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits_TV, labels_T, idx_T, group, chunk_tokens, inplace_backward):
        vocab_local = logits_TV.shape[-1]
        label_T, owned_T = owned_labels(labels_T[idx_T], group_rank(group) * vocab_local, vocab_local)
        dtype = compute_dtype(logits_TV.dtype)
        pieces = _pieces(idx_T, chunk_tokens)
        # In fp64 (O(tokens)): log p = x_label - lse loses nothing to a large lse.
        target_T = logits_TV[idx_T, label_T].double()
        lse_T = _local_lse(logits_TV, target_T, pieces, chunk_tokens, dtype)
        if group_size(group) > 1 and idx_T.numel():
            lse_T, target_T = all_reduce_lse(lse_T, torch.where(owned_T, target_T, 0.0), group)
        lse_hi_T, lse_lo_T = split_lse(lse_T, dtype)
        ctx.save_for_backward(logits_TV, label_T, owned_T, lse_hi_T, lse_lo_T)
        ctx.pieces, ctx.inplace_backward, ctx.backward_done = pieces, inplace_backward, False
        return (target_T - lse_T).to(dtype)

    @staticmethod
    def backward(ctx, grad_T):
        if ctx.inplace_backward and ctx.backward_done:
            raise RuntimeError(
                "token_logprobs(inplace_backward=True): a second backward through the same log-probs (retain_graph) "
                "would read logits that the first backward overwrote with their gradient; use inplace_backward=False"
            )
        ctx.backward_done = True
        logits_TV, label_T, owned_T, lse_hi_T, lse_lo_T = ctx.saved_tensors
        # In place (Megatron's vocab_parallel_cross_entropy writes its gradient into its saved
        # softmax the same way): no [T, V] allocation, and the write bumps the logits' version
        # counter, so any other saved use of them fails loudly at its backward.
        grad_logits_TV = logits_TV if ctx.inplace_backward else torch.empty_like(logits_TV)
        _zero_gaps(grad_logits_TV, ctx.pieces)  # tokens outside the loss get no gradient
        scales = softmax_grad_scales(grad_T, lse_lo_T, owned_T)
        direct = grad_logits_TV.dtype == lse_hi_T.dtype
        for a, b, o in ctx.pieces:
            sl = slice(o, o + b - a)
            # Direct: written straight into the gradient's rows (the logits' own rows in place).
            rows_CV = softmax_grad_rows(
                logits_TV[a:b], sl, lse_hi_T, label_T, scales, out=grad_logits_TV[a:b] if direct else None
            )
            if not direct:  # bf16/fp16 logits: finished in fp32 (promotion), rounded once here
                grad_logits_TV[a:b].copy_(rows_CV)
            del rows_CV
        return grad_logits_TV, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup],
    mask: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """log p(labels) (fp32; fp64 for fp64 logits) from this rank's vocabulary slice of ``logits``.

    ``logits`` [..., V] hold vocabulary entries [r V, (r + 1) V) on rank r of
    ``tp_group`` (Megatron's ``VocabParallelEmbedding`` split; ``None``: the full
    vocabulary). ``labels`` has the leading shape of ``logits``. Only positions where
    ``mask`` is non-zero are computed; the others are 0 and pass no gradient. Every
    rank of ``tp_group`` must pass the same labels and mask.

    ``inplace_backward``: backward writes the logits' gradient into the logits' own
    storage (no [T, V] allocation). Only for logits that nothing else reads after this
    backward, such as the output layer's logits in the training step; a single backward
    only (no retain_graph), and not for leaf tensors, whose values would be lost.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logprobs: labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)} "
            "without the vocabulary dimension"
        )
    if not logits.is_floating_point():
        raise ValueError(f"token_logprobs: logits must be floating point, got {logits.dtype}")
    storage = logits if logits._base is None else logits._base
    if inplace_backward and storage.requires_grad and storage.grad_fn is None:
        raise ValueError(
            "token_logprobs: inplace_backward=True would overwrite a leaf tensor (or a view of one) with its own "
            "gradient; pass logits produced by an autograd op (the output layer's), or use inplace_backward=False"
        )
    vocab_local = logits.shape[-1]
    labels_T, idx_T = select_tokens(labels, mask, vocab_local, tp_group, "token_logprobs")
    chunk = resolve_chunk_tokens(chunk_tokens, default_chunk_tokens(vocab_local, logits.device), "token_logprobs")
    logp_sel_T = _VocabParallelLogprobs.apply(
        logits.reshape(-1, vocab_local), labels_T, idx_T, tp_group, chunk, inplace_backward
    )
    return scatter_selected(logp_sel_T, idx_T, labels.shape)


# Ours, not torch.distributed.nn.functional.all_reduce (same backward): torch 2.13 warns it is deprecated on every call.
class _AllReduceSum(torch.autograd.Function):
    """SUM all-reduce whose backward is a SUM all-reduce of the gradient (see ``reduce_stats``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sequence_stats(
    logp: torch.Tensor,
    segment_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    num_seqs: int,
    cp_group: Optional[dist.ProcessGroup] = None,
) -> SequenceStats:
    """Per-sequence sums over response tokens, each [N] (fp32, or fp64 for fp64 logp).

    ``sum_logp`` = sum of log p (carries the gradient), ``n`` = token count,
    ``sum_p`` / ``sum_p2`` = sums of p and p^2 with p = exp(log p) (no gradient: the
    AMoPO weights are constants). A token counts when ``loss_mask`` > 0; its sequence
    is ``segment_ids`` (0 <= id < ``num_seqs``). With ``cp_group`` the partial sums
    of this rank's part of each sequence are all-reduced over the CP group.
    """
    if not (logp.shape == segment_ids.shape == loss_mask.shape):
        raise ValueError(
            f"sequence_stats: logp {tuple(logp.shape)}, segment_ids {tuple(segment_ids.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must have the same shape"
        )
    sel_T = loss_mask.reshape(-1) > 0
    seg_T = segment_ids.reshape(-1)[sel_T].to(torch.int64)
    if seg_T.numel() and (seg_T.min() < 0 or seg_T.max() >= num_seqs):
        raise ValueError(
            f"sequence_stats: loss-masked tokens must belong to sequences 0..{num_seqs - 1}, got segment ids in "
            f"[{int(seg_T.min())}, {int(seg_T.max())}] (a response token on padding, or a wrong num_seqs)"
        )
    logp_T = logp.reshape(-1)[sel_T].to(compute_dtype(logp.dtype))
    p_T = logp_T.detach().exp()
    zeros_N = logp_T.new_zeros(num_seqs)
    stats = SequenceStats(
        sum_logp=zeros_N.index_add(0, seg_T, logp_T),
        n=zeros_N.index_add(0, seg_T, torch.ones_like(p_T)),
        sum_p=zeros_N.index_add(0, seg_T, p_T),
        sum_p2=zeros_N.index_add(0, seg_T, p_T * p_T),
    )
    if cp_group is not None and group_size(cp_group) > 1:
        stats = reduce_stats(stats, cp_group)
    return stats


def reduce_stats(stats: SequenceStats, cp_group: dist.ProcessGroup) -> SequenceStats:
    """Sum partial statistics over the CP group (gradient only through ``sum_logp``).

    The backward of ``sum_logp``'s all-reduce is a SUM all-reduce too: every CP rank computes the
    same loss, so each rank's partial sums get CP-size times dL/dstat, Megatron's CP convention
    (gradients summed over DP x CP, divided by the loss count summed over DP x CP).
    """
    sum_logp_N = _AllReduceSum.apply(stats.sum_logp, cp_group)
    rest_3N = torch.stack([t.detach() for t in stats[1:]])
    dist.all_reduce(rest_3N, op=dist.ReduceOp.SUM, group=cp_group)
    return SequenceStats(sum_logp_N, *rest_3N.unbind(0))
