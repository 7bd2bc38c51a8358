"""One micro-batch through the model and the AMoPO loss, in the shape of Megatron's
``pretrain_gpt.py``: ``get_batch``, ``forward_step``, ``loss_func``.

Everything a run chooses is bound with ``functools.partial`` (no globals), and ``training.engine.Engine``
is the one place that runs Megatron's schedule over it::

    step = bind_forward_step(cfg.amopo)          # the run's process groups from parallel_state
    engine = Engine(model_chunks, step, optimizer, scheduler)
    reports = engine.forward_backward(micro_batches)  # list[StepReport] on the last stage

The data iterator yields ``data.batch.MicroBatch``es, built in the form the model takes (rows
with a mask, or one THD stream). ``micro_batch_size`` is the number of rows R of a micro-batch,
2P sequences per sample in the padded layout; packed micro-batches vary in R and S (a THD stream
is [1, T]), so pipeline parallelism then needs ``config.variable_seq_lengths = True``.

Loss convention (Megatron-Core 0.16, ``calculate_per_token_loss=True``): ``loss_func``
returns (sum of per-sample losses, number of valid samples, report). The schedule sums
both over micro-batches; ``finalize_model_grads`` divides the gradients by the count
summed over DP x CP. The global-batch loss is thus the mean over valid samples for any
micro-batch split and DP size. Under context parallelism every CP rank returns the full
loss and count; ``sequence_stats``' all-reduce backward sums the CP copies so the
gradients match that count.

Shapes (legend in docs/DESIGN.md): R rows, S positions per row (this CP rank's share), T tokens
of a THD stream, V vocabulary slice, N sequences, B samples, P pairs, M micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_amopo.config import AmopoConfig
from megatron_amopo.data.batch import MicroBatch
from megatron_amopo.model.sharding import unwrap
from megatron_amopo.objective.amopo import amopo_loss, reduce_for_schedule
from megatron_amopo.objective.fused_logprobs import fused_token_logprobs
from megatron_amopo.objective.logprobs import sequence_stats, token_logprobs

# MicroBatch fields laid out along the sequence (split over CP ranks); the rest are per sample/sequence.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "attention_mask")


@dataclasses.dataclass
class StepReport:
    """What ``loss_func`` reports for one micro-batch (detached clones: the schedule may divide the
    returned loss in place). ``loss_sum``, ``count``, ``pair_sums`` and ``pair_counts`` are sums the
    engine all-reduces over ranks (``sums``); the rest are this micro-batch's own, per sample."""

    loss_sum: torch.Tensor  # [] sum of the valid samples' losses
    count: torch.Tensor  # [] valid samples, in loss_sum's dtype
    pair_sums: torch.Tensor  # [E, P] sums of the pair metrics (objective.amopo.PAIR_METRIC_NAMES)
    pair_counts: torch.Tensor  # [P] valid (sample, pair)s
    weights: torch.Tensor  # [B, P] AMoPO pair weights
    pair_margins: torch.Tensor  # [B, P] beta * (a_chosen - a_rejected)
    pair_valid: torch.Tensor  # bool [B, P] pairs with a response token on both sides
    sample_ids: torch.Tensor  # int64 [B] global sample (group) ids

    @classmethod
    def of(cls, loss_sum: torch.Tensor, count: torch.Tensor, metrics: dict, ids_B: torch.Tensor) -> StepReport:
        """The report of ``amopo_loss``'s metrics and ``reduce_for_schedule``'s (loss_sum, count)."""
        keep = lambda t: t.detach().clone()  # noqa: E731
        return cls(
            loss_sum=keep(loss_sum),
            count=keep(count).to(loss_sum.dtype),
            pair_sums=keep(metrics["pair_sums"]),
            pair_counts=keep(metrics["pair_counts"]),
            weights=keep(metrics["weights"]),
            pair_margins=keep(metrics["pair_margins"]),
            pair_valid=keep(metrics["pair_valid"]),
            sample_ids=keep(ids_B),
        )

    def sums(self) -> torch.Tensor:
        """float64 [2 + E*P + P]: loss_sum, count, pair_sums, pair_counts, flat, on their device."""
        parts = (self.loss_sum, self.count, self.pair_sums, self.pair_counts)
        return torch.cat([t.detach().reshape(-1).double() for t in parts])


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator: Iterator[MicroBatch], cp_group: Optional[dist.ProcessGroup] = None) -> MicroBatch:
    """The next micro-batch on this rank's device, sliced to this rank's CP share."""
    batch = next(data_iterator)
    if not isinstance(batch, MicroBatch):
        raise TypeError(
            f"the data iterator yielded a {type(batch).__name__}; build micro-batches with "
            "megatron_amopo.data.batch.build_micro_batch"
        )
    batch = batch.to(_device())
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        if batch.thd:
            raise NotImplementedError(
                "packed micro-batches with context parallelism need padded THD boundaries (cu_seqlens_padded), "
                "which the builder does not make; use --batch-layout padded with --context-parallel-size > 1"
            )
        from megatron.core.utils import get_batch_on_this_cp_rank

        # Megatron's load-balanced split: chunks r and 2 CP - 1 - r of the sequence on rank r.
        shares = get_batch_on_this_cp_rank({k: getattr(batch, k) for k in SEQUENCE_KEYS}, cp_group)
        batch = dataclasses.replace(batch, **shares)
    return batch


def loss_func(
    batch: MicroBatch,
    cfg: AmopoConfig,
    output: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    cp_group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
    output_weight: Optional[torch.Tensor] = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, StepReport]:
    """logits [R, S, V] -> token log-probs -> stats [B, P, 2] -> AMoPO -> (loss_sum, count, report).

    With ``output_weight`` (this rank's output-layer weight [V, H]), ``output`` is instead the final
    hidden states [S, R, H] (this rank's share of S under ``sequence_parallel``) and the log-probs
    come from ``fused_token_logprobs``: no logits tensor. Rows or a THD stream alike: the statistics
    are sums over each sequence's tokens.
    """
    logp_RS = output_logprobs(
        batch,
        output,
        tp_group=tp_group,
        chunk_tokens=chunk_tokens,
        output_weight=output_weight,
        sequence_parallel=sequence_parallel,
    )
    ids_B = batch.sample_ids
    num_seqs, num_samples = batch.num_seqs, ids_B.numel()
    if num_samples == 0 or num_seqs % (2 * num_samples):
        raise ValueError(
            f"micro-batch has {num_seqs} sequences for {num_samples} samples; expected 2P sequences per sample"
        )
    stats_N = sequence_stats(logp_RS, batch.segment_ids, batch.loss_mask, num_seqs, cp_group)
    stats_BP2 = stats_N.pairs(num_seqs // (2 * num_samples))
    loss_B, metrics = amopo_loss(stats_BP2, cfg, sample_ids=ids_B, epoch=batch.epoch)
    loss_sum, count = reduce_for_schedule(loss_B, metrics)
    return loss_sum, count, StepReport.of(loss_sum, count, metrics, ids_B)


def output_logprobs(
    batch: MicroBatch,
    output: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
    output_weight: Optional[torch.Tensor] = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Token log-probs [R, S] of the labels (0 outside the loss mask) from the last stage's output:
    logits [R, S, V], or hidden states [S, R, H] with ``output_weight`` (see ``loss_func``)."""
    labels_RS, mask_RS = batch.labels, batch.loss_mask
    if output_weight is not None:  # Megatron's [s, b, h] order: labels and mask follow it, not the other way
        return fused_token_logprobs(
            output,
            output_weight,
            labels_RS.t(),
            tp_group,
            mask=mask_RS.t(),
            chunk_tokens=chunk_tokens,
            sequence_parallel=sequence_parallel,
        ).t()
    # The model's logits come out of the output layer and nothing else reads them: their storage
    # takes the gradient. Logits that are leaves (tests, tools) keep theirs.
    return token_logprobs(
        output,
        labels_RS,
        tp_group,
        mask=mask_RS,
        chunk_tokens=chunk_tokens,
        inplace_backward=output.grad_fn is not None,
    )


def packed_seq_params(batch: MicroBatch, tp_group=None, sequence_parallel: bool = False):
    """Megatron ``PackedSeqParams`` (qkv_format "thd") of a THD micro-batch; None for rows.

    Checks on the host what the attention takes on trust: under sequence parallelism T must split
    evenly over the TP ranks (the builder's ``pad_to_multiple``, ``seq_pad_multiple``)."""
    if not batch.thd:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    if sequence_parallel and batch.tokens.shape[1] % tp:
        raise ValueError(
            f"sequence parallelism splits the THD stream over {tp} TP ranks, but it has {batch.tokens.shape[1]} "
            "tokens: build it with build_micro_batch(..., pad_to_multiple=seq_pad_multiple(config))"
        )
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=batch.cu_seqlens,
        cu_seqlens_kv=batch.cu_seqlens,
        max_seqlen_q=batch.max_seqlen,
        max_seqlen_kv=batch.max_seqlen,
    )


def seq_pad_multiple(config) -> int:
    """What a row's width or a THD stream's length must divide by: the TP size under sequence parallelism."""
    if getattr(config, "sequence_parallel", False):
        return int(config.tensor_model_parallel_size)
    return 1


def packed_thd_default(config, use_te: Optional[bool] = None) -> bool:
    """Whether packed micro-batches are built as one THD stream: with TE (its fused attention needs
    THD for packing), and without TE where ``SDPAttention`` has variable-length flash attention
    (CUDA, bf16/fp16, a torch with ``varlen_attn``): it skips the masked blocks that the rows'
    block-diagonal mask computes (measured on an H200 in docs/GPU.md). ``use_te``: whether the
    TE layer spec runs (default: ``provider.transformer_engine_available()``)."""
    if use_te is None:
        from megatron_amopo.model.provider import transformer_engine_available

        use_te = transformer_engine_available()
    if use_te:
        return True
    from megatron_amopo.model.attention import flash_head_size_ok, varlen_causal_attention

    half = bool(getattr(config, "bf16", False) or getattr(config, "fp16", False))
    return (
        torch.cuda.is_available()
        and half
        and flash_head_size_ok(getattr(config, "kv_channels", 0) or 0)
        and varlen_causal_attention() is not None
    )


def forward_step(
    data_iterator: Iterator[MicroBatch],
    model: torch.nn.Module,
    *,
    objective_cfg: AmopoConfig,
    tp_group: Optional[dist.ProcessGroup] = None,
    cp_group: Optional[dist.ProcessGroup] = None,
    chunk_tokens: Optional[int] = None,
    use_te: Optional[bool] = None,
) -> tuple[torch.Tensor, Any]:
    """Megatron ``forward_step_func``: (output tensor, loss function of that output).

    The loss function is only called on the last pipeline stage (by the schedule). The batch comes
    as the model takes it: a THD stream goes in with its ``PackedSeqParams``, rows with their mask.
    ``use_te``: whether the TE layer spec runs (default: ``provider.transformer_engine_available()``).
    """
    batch = get_batch(data_iterator, cp_group)
    sequence_parallel = bool(getattr(getattr(model, "config", None), "sequence_parallel", False))
    if batch.layout == "packed" and not batch.thd and _te_spec(use_te):
        raise ValueError(
            "packed rows reach the TE layer spec, whose attention ignores their block-diagonal mask: build packed "
            "micro-batches with build_micro_batch(..., thd=True) (training.step.packed_thd_default)"
        )
    params = packed_seq_params(batch, tp_group, sequence_parallel)
    gpt = unwrap(model)
    fused = objective_cfg.output_layer == "fused" and getattr(gpt, "post_process", False)
    weight = output_weight(gpt) if fused else None
    with hidden_states_out(gpt) if fused else contextlib.nullcontext():
        output = model(batch.tokens, batch.position_ids, batch.attention_mask, packed_seq_params=params)
    loss = functools.partial(
        loss_func,
        batch,
        objective_cfg,
        tp_group=tp_group,
        cp_group=cp_group,
        chunk_tokens=chunk_tokens,
        output_weight=weight,
        sequence_parallel=sequence_parallel,
    )
    return output, loss


def bind_forward_step(objective_cfg, **kw: Any) -> Callable[..., tuple[torch.Tensor, Any]]:
    """``forward_step`` bound to the objective and this rank's TP and CP groups (``parallel_state``);
    ``kw``: the other keyword arguments of ``forward_step`` (``chunk_tokens``, ``use_te``)."""
    from megatron.core import parallel_state as ps

    return functools.partial(
        forward_step,
        objective_cfg=objective_cfg,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        **kw,
    )


def _te_spec(use_te: Optional[bool]) -> bool:
    if use_te is None:
        from megatron_amopo.model.provider import transformer_engine_available

        return transformer_engine_available()
    return use_te


def output_weight(gpt: Any) -> torch.Tensor:
    """This rank's output-layer weight [V, H], as ``GPTModel._postprocess`` hands it to the output layer:
    the shared embedding when tied (the last stage's copy under PP), else ``output_layer.weight``."""
    if getattr(gpt.config, "mtp_num_layers", None):
        raise NotImplementedError(
            "--amopo-output-layer fused does not cover multi-token prediction (its losses need the output layer's "
            "logits); use --amopo-output-layer logits"
        )
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def hidden_states_out(gpt: Any) -> Iterator[None]:
    """Within the block, ``GPTModel.forward`` returns the final hidden states (after the final norm,
    [S, R, H]) instead of the logits: ``_postprocess`` returns them when ``post_process`` is off, and
    nothing else in the forward reads the flag (Megatron-Core 0.16; see docs/DESIGN.md)."""
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = True
