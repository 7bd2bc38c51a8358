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

# Budget of one [C, Vb] tile of logits, and the most loss tokens a tile takes. Tiles run over the vocabulary
# inside a token chunk, so each chunk reads the weight once per pass and its weight gradient is written once
# per chunk: with chunks of thousands of tokens that traffic is small next to the GEMMs (docs/DESIGN.md).
DEFAULT_CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1 * 2**30}
DEFAULT_CHUNK_TOKENS = {"cpu": 4096, "cuda": 16384}


def default_chunk_tokens(device: torch.device) -> int:
    return DEFAULT_CHUNK_TOKENS.get(device.type, DEFAULT_CHUNK_TOKENS["cuda"])


def default_vocab_block(chunk_tokens: int, vocab_local: int, device: torch.device) -> int:
    budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(1, min(vocab_local, budget // (4 * max(chunk_tokens, 1))))


class _FusedLinearLogprobs(torch.autograd.Function):
    """log p(label) of the selected tokens from hidden states [T, H] and this rank's weight [V, H]."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, idx_T, group, chunk_tokens, vocab_block):
        vocab_local = weight_VH.shape[0]
        label_T, owned_T = owned_labels(labels_T[idx_T], group_rank(group) * vocab_local, vocab_local)
        dtype = compute_dtype(hidden_TH.dtype)
        target_T = hidden_TH.new_zeros(idx_T.numel(), dtype=torch.float64)
        lse_T = torch.empty_like(target_T)
        for sl in _chunks(idx_T.numel(), chunk_tokens):
            h_CH = hidden_TH[idx_T[sl]]
            max_C = torch.full((h_CH.shape[0],), -torch.inf, dtype=torch.float64, device=h_CH.device)
            sum_C = torch.zeros_like(max_C)
            for vb in _chunks(vocab_local, vocab_block):
                x_CV = torch.mm(h_CH, weight_VH[vb].t()).to(dtype)  # the output layer's GEMM, then fp32
                local_C, inside_C = _block_labels(label_T[sl], owned_T[sl], vb)
                label_C = x_CV.gather(1, local_C[:, None]).squeeze(1).double()
                target_T[sl] = torch.where(inside_C, label_C, target_T[sl])
                # online log-sum-exp over the vocabulary blocks: sum exp(x - m) rescaled when m grows
                new_C = torch.maximum(max_C, torch.amax(x_CV, dim=1).double())
                block_C = torch.sum(x_CV.sub_(new_C[:, None].to(dtype)).exp_(), dim=1).double()
                sum_C = sum_C * torch.exp(max_C - new_C) + block_C
                max_C = new_C
            lse_T[sl] = max_C + sum_C.log()
        if group_size(group) > 1 and idx_T.numel():
            lse_T, target_T = all_reduce_lse(lse_T, torch.where(owned_T, target_T, 0.0), group)
        lse_hi_T, lse_lo_T = split_lse(lse_T, dtype)
        ctx.save_for_backward(hidden_TH, weight_VH, idx_T, label_T, owned_T, lse_hi_T, lse_lo_T)
        ctx.tiles = (chunk_tokens, vocab_block)
        return (target_T - lse_T).to(dtype)

    @staticmethod
    def backward(ctx, grad_T):
        hidden_TH, weight_VH, idx_T, label_T, owned_T, lse_hi_T, lse_lo_T = ctx.saved_tensors
        chunk_tokens, vocab_block = ctx.tiles
        scale_T, onehot_T = softmax_grad_scales(grad_T, lse_lo_T, owned_T)
        dtype = lse_hi_T.dtype
        grad_h_TH = torch.zeros_like(hidden_TH)  # tokens outside the loss get no gradient
        grad_w_VH = torch.zeros_like(weight_VH, dtype=dtype)  # fp32: written once per token chunk
        for sl in _chunks(label_T.numel(), chunk_tokens):
            rows_C = idx_T[sl]
            h_CH = hidden_TH[rows_C]
            grad_h_CH = torch.zeros_like(h_CH, dtype=dtype)
            for vb in _chunks(weight_VH.shape[0], vocab_block):
                w_VH = weight_VH[vb]
                x_CV = torch.mm(h_CH, w_VH.t())
                local_C, inside_C = _block_labels(label_T[sl], owned_T[sl], vb)
                onehot_C = torch.where(inside_C, onehot_T[sl], 0.0)
                # g * (onehot - softmax) of the tile, the softmax from the saved global log-sum-exp
                rows_CV = softmax_grad_rows(
                    x_CV,
                    slice(None),
                    lse_hi_T[sl],
                    local_C,
                    (scale_T[sl], onehot_C),
                    out=x_CV if x_CV.dtype == dtype else None,
                )
                g_CV = rows_CV.to(hidden_TH.dtype)  # the output layer's GEMM dtype
                grad_h_CH.add_(torch.mm(g_CV, w_VH))
                grad_w_VH[vb].add_(torch.mm(g_CV.t(), h_CH))
            grad_h_TH.index_copy_(0, rows_C, grad_h_CH.to(hidden_TH.dtype))
        return grad_h_TH, grad_w_VH.to(weight_VH.dtype), None, None, None, None, None


def _block_labels(label_C: torch.Tensor, owned_C: torch.Tensor, vb: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index within vocabulary block ``vb``, clamped to be valid; whether the block holds it): on the
    device, no host sync per tile."""
    inside_C = owned_C & (label_C >= vb.start) & (label_C < vb.stop)
    return torch.where(inside_C, label_C - vb.start, torch.zeros_like(label_C)), inside_C


def _chunks(num: int, size: int) -> list[slice]:
    """Consecutive slices of ``num`` items, ``size`` each (the last may be shorter)."""
    return [slice(a, min(a + size, num)) for a in range(0, num, size)]


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup],
    mask: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    sequence_parallel: bool = False,
    vocab_block: Optional[int] = None,
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
    if group_size(tp_group) > 1:
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
    labels_T, idx_T = select_tokens(labels, mask, vocab_local, tp_group, who)
    chunk = resolve_chunk_tokens(chunk_tokens, default_chunk_tokens(hidden.device), who)
    block = vocab_block if vocab_block is not None else default_vocab_block(chunk, vocab_local, hidden.device)
    if block < 1:
        raise ValueError(f"{who}: vocab_block must be >= 1, got {block}")
    hidden_TH = hidden.reshape(-1, hidden.shape[-1])
    logp_sel_T = _FusedLinearLogprobs.apply(hidden_TH, weight, labels_T, idx_T, tp_group, chunk, block)
    return scatter_selected(logp_sel_T, idx_T, labels.shape)
