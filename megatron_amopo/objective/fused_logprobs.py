"""Token log-probs straight from the final hidden states: the output layer fused into the log-prob pass.

``fused_token_logprobs`` gives what ``token_logprobs`` gives for the logits ``hidden @ weight.T``
(the output layer's GEMM, ``ColumnParallelLinear`` with vocab-sharded ``weight``) without ever
holding them: the loss tokens are taken in chunks, each chunk's logits are formed, reduced to a
log-sum-exp and the label's logit (the same all-reduces over the tensor-parallel group as
``token_logprobs``), and freed. Backward forms each chunk's logits again and turns them into
g * (onehot - softmax) in place, which gives the chunk's rows of the hidden states' gradient and
its share of the weight's (accumulated in fp32). The algorithm and its costs are in
docs/DESIGN.md ("Log-probs without logits").

The hidden states enter the tensor-parallel region as they do in the output layer: copied
(gradient all-reduced over the group) or, with sequence parallelism, gathered along the
sequence (gradient reduce-scattered back), through Megatron-Core's own mappings.

Shape legend (as in ``logprobs.py``): T tokens, V vocabulary entries on this rank, H hidden
size, C tokens in one chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_amopo.objective.logprobs import (
    _chunk,
    _combine_lse,
    _grad_scales,
    _group_rank,
    _group_size,
    _local_lse,
    _owned_labels,
    _scatter_selected,
    _selection,
    _softmax_grad_rows,
    _split,
    compute_dtype,
)

# Budget of one chunk's [C, V] logits. Larger than ``token_logprobs``' buffer: each chunk reads the
# whole weight, so C must be large enough for the GEMM to be compute-bound (see docs/DESIGN.md).
DEFAULT_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1 * 2**30}


def default_chunk_tokens(vocab_local: int, device: torch.device) -> int:
    budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * max(vocab_local, 1)))


class _FusedLinearLogprobs(torch.autograd.Function):
    """log p(label) of the selected tokens from hidden states [T, H] and this rank's weight [V, H]."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, idx_T, group, chunk_tokens):
        vocab_local = weight_VH.shape[0]
        label_T, owned_T = _owned_labels(labels_T[idx_T], _group_rank(group) * vocab_local, vocab_local)
        dtype = compute_dtype(hidden_TH.dtype)
        target_T = hidden_TH.new_empty(idx_T.numel(), dtype=torch.float64)
        lse_T = torch.empty_like(target_T)
        buf_CV = hidden_TH.new_empty(min(chunk_tokens, idx_T.numel()), vocab_local)
        for sl in _chunks(idx_T.numel(), chunk_tokens):
            n = sl.stop - sl.start
            x_CV = torch.mm(hidden_TH[idx_T[sl]], weight_VH.t(), out=buf_CV[:n])
            target_T[sl] = x_CV.gather(1, label_T[sl, None]).squeeze(1)
            # The chunk is not read again: the CPU path exponentiates it in place.
            work = x_CV if x_CV.dtype == dtype else None
            lse_T[sl] = _local_lse(x_CV, target_T[sl], [(0, n, 0)], n, dtype, work_CV=work)
        del buf_CV
        if _group_size(group) > 1 and idx_T.numel():
            lse_T, target_T = _combine_lse(lse_T, torch.where(owned_T, target_T, 0.0), group)
        lse_hi_T, lse_lo_T = _split(lse_T, dtype)
        ctx.save_for_backward(hidden_TH, weight_VH, idx_T, label_T, owned_T, lse_hi_T, lse_lo_T)
        ctx.chunk_tokens = chunk_tokens
        return (target_T - lse_T).to(dtype)

    @staticmethod
    def backward(ctx, grad_T):
        hidden_TH, weight_VH, idx_T, label_T, owned_T, lse_hi_T, lse_lo_T = ctx.saved_tensors
        scales = _grad_scales(grad_T, lse_lo_T, owned_T)
        direct = hidden_TH.dtype == lse_hi_T.dtype
        grad_h_TH = torch.zeros_like(hidden_TH)  # tokens outside the loss get no gradient
        grad_w_VH = torch.zeros_like(weight_VH, dtype=lse_hi_T.dtype)  # fp32 accumulation over chunks
        buf_CV = hidden_TH.new_empty(min(ctx.chunk_tokens, label_T.numel()), weight_VH.shape[0])
        part_VH = None if direct else torch.empty_like(weight_VH)
        for sl in _chunks(label_T.numel(), ctx.chunk_tokens):
            rows_C, n = idx_T[sl], sl.stop - sl.start
            h_CH = hidden_TH[rows_C]
            x_CV = torch.mm(h_CH, weight_VH.t(), out=buf_CV[:n])
            rows_CV = _softmax_grad_rows(x_CV, sl, lse_hi_T, label_T, scales, out=x_CV if direct else None)
            g_CV = rows_CV if direct else rows_CV.to(hidden_TH.dtype)  # the output layer's GEMM dtype
            grad_h_TH.index_copy_(0, rows_C, torch.mm(g_CV, weight_VH))
            if direct:
                grad_w_VH.addmm_(g_CV.t(), h_CH)
            else:
                grad_w_VH.add_(torch.mm(g_CV.t(), h_CH, out=part_VH))
            del rows_CV, g_CV
        return grad_h_TH, grad_w_VH.to(weight_VH.dtype), None, None, None, None


def _chunks(num_tokens: int, chunk_tokens: int) -> list[slice]:
    """Consecutive slices of the selected tokens, ``chunk_tokens`` each: every GEMM but the last is
    full-sized however the loss tokens lie (their hidden states are gathered, [C, H] per chunk)."""
    return [slice(a, min(a + chunk_tokens, num_tokens)) for a in range(0, num_tokens, chunk_tokens)]


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup],
    mask: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """log p(labels) (fp32; fp64 for fp64 inputs) for the logits ``hidden @ weight.T``, never formed.

    ``hidden`` [..., H]: final hidden states (after the final norm); with ``sequence_parallel``
    this rank's part of dimension 0, which is gathered over ``tp_group`` first. ``weight``
    [V, H]: this rank's rows [r V, (r + 1) V) of the output weight (the embedding when tied).
    ``labels`` and ``mask`` have the leading shape of the (gathered) hidden states; as in
    ``token_logprobs``, only positions where ``mask`` is non-zero are computed, and every rank
    of ``tp_group`` passes the same labels and mask.
    """
    who = "fused_token_logprobs"
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [..., H] "
            "and [V, H] (this rank's output-layer weight)"
        )
    if not (hidden.is_floating_point() and hidden.dtype == weight.dtype):
        raise ValueError(f"{who}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a floating dtype")
    if _group_size(tp_group) > 1:
        from megatron.core.tensor_parallel import mappings

        if sequence_parallel:
            hidden = mappings.gather_from_sequence_parallel_region(hidden, True, group=tp_group)
        else:
            hidden = mappings.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"{who}: labels of shape {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)} "
            "without the hidden dimension (after the sequence-parallel gather)"
        )
    vocab_local = weight.shape[0]
    labels_T, idx_T = _selection(labels, mask, vocab_local, tp_group, who)
    chunk = _chunk(chunk_tokens, default_chunk_tokens(vocab_local, hidden.device), who)
    hidden_TH = hidden.reshape(-1, hidden.shape[-1])
    logp_sel_T = _FusedLinearLogprobs.apply(hidden_TH, weight, labels_T, idx_T, tp_group, chunk)
    return _scatter_selected(logp_sel_T, idx_T, labels.shape)
