"""Whole model with SDPA core attention equals the unfused DotProductAttention model at TP1 and TP2.

Two gloo ranks build the tiny Qwen2 model (4 heads, 2 query groups: at TP2 each rank holds
2 heads and 1 group) with the same deterministic weights, run padded rows (Megatron mask),
packed rows (block-diagonal mask) and padded rows without a mask (causal kernel) through
the real AMoPO ``loss_func`` and backward, once with ``SDPAttention`` (the local spec's
choice) and once with the attention modules swapped for Megatron's unfused one. Logits and
every local gradient must agree within fp32 tolerance, and TP2 must give TP1's logits.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.data.batch import Group
from megatron_amopo.testing import run_multirank

SEED, SEQ = 11, 32


def _groups(vocab: int) -> list[Group]:
    gen = torch.Generator().manual_seed(5)
    groups = []
    for g in range(2):
        lengths = torch.randint(6, 17, (4,), generator=gen).tolist()  # P = 2 pairs
        groups.append(
            Group(
                tokens=[torch.randint(0, vocab, (n,), generator=gen) for n in lengths],
                response_start=torch.tensor([3, 4, 2, 5]),
                group_id=g,
                row_id=g,
                chosen_scores=torch.tensor([4.0]),
                rejected_scores=torch.tensor([2.0]),
            )
        )
    return groups


def _step(model, batch, use_mask: bool, tp_group):
    from megatron.core import tensor_parallel

    from megatron_amopo.config import AmopoConfig
    from megatron_amopo.training.step import loss_func

    model.zero_grad(set_to_none=True)
    mask = batch.attention_mask if use_mask else None
    logits = model(batch.tokens, batch.position_ids, mask)
    loss_sum, _, _ = loss_func(batch, AmopoConfig(), logits, tp_group=tp_group)
    loss_sum.backward()
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return full, loss_sum.item(), grads


def _swap_core_attention(model, unfused: bool) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_amopo.model.attention import SDPAttention

    for layer in model.decoder.layers:
        old = layer.self_attention.core_attention
        cls = DotProductAttention if unfused else SDPAttention
        layer.self_attention.core_attention = cls(
            config=old.config,
            layer_number=old.layer_number,
            attn_mask_type=old.attn_mask_type,
            attention_type="self",
        )


def _run_tp(tp: int) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.model.attention import SDPAttention
    from megatron_amopo.model.provider import model_provider, transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.testing.tiny import fill_deterministic, tiny_arch

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    initialize_distributed(parallel)
    set_seed(SEED)
    arch = tiny_arch("qwen2", tie_word_embeddings=True)
    model = model_provider(arch, transformer_config(arch, parallel), use_te=False)
    assert all(type(layer.self_attention.core_attention) is SDPAttention for layer in model.decoder.layers)
    fill_deterministic(model, SEED, ps.get_tensor_model_parallel_rank(), tp)
    tp_group = ps.get_tensor_model_parallel_group()
    groups = _groups(arch.vocab_size)
    cases = {
        "padded": (build_micro_batch(groups, "padded"), True),
        "packed": (build_micro_batch(groups, "packed", seq_length=SEQ), True),
        "causal-no-mask": (build_micro_batch(groups, "padded"), False),
    }
    out = {}
    for name, (batch, use_mask) in cases.items():
        _swap_core_attention(model, unfused=False)
        logits, loss, grads = _step(model, batch, use_mask, tp_group)
        _swap_core_attention(model, unfused=True)
        logits_ref, loss_ref, grads_ref = _step(model, batch, use_mask, tp_group)
        grad_diff = max(
            ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in grads_ref.items()
        )
        out[name] = dict(
            logits=logits,
            loss=loss,
            loss_ref=loss_ref,
            grad_rel_diff=grad_diff,
            logit_diff=(logits - logits_ref).abs().max().item(),
            grads_nonzero=all(g.abs().max() > 0 for g in grads_ref.values()),
        )
    return out


def _body():
    return {tp: _run_tp(tp) for tp in (1, 2)}


@pytest.mark.distributed
def test_sdpa_matches_unfused_at_tp1_and_tp2():
    per_rank = run_multirank(_body, 2, timeout=240)
    for rank, res in enumerate(per_rank):
        for tp in (1, 2):
            for name, r in res[tp].items():
                where = (rank, tp, name)
                assert r["grads_nonzero"], where
                assert r["logit_diff"] <= 1e-5, where
                assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-5, abs=1e-6), where
                assert r["grad_rel_diff"] <= 1e-4, where
    res = per_rank[0]
    for name in res[1]:
        assert res[2][name]["logits"].shape == res[1][name]["logits"].shape
        assert (res[2][name]["logits"] - res[1][name]["logits"]).abs().max() <= 1e-5, name
        assert res[2][name]["loss"] == pytest.approx(res[1][name]["loss"], rel=1e-5)
    # The block-diagonal mask matters: packed logits differ from what plain causal rows would give.
    assert res[1]["packed"]["logits"].shape[0] < res[1]["padded"]["logits"].shape[0]
