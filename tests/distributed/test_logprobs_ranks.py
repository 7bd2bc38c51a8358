"""Vocab-parallel log-probs and sequence statistics on 2 gloo ranks (one spawn): TP=2 against the
full vocabulary, the real CP all-reduce of the statistics (forward and backward), and padded vs
packed micro-batches through the real tiny Megatron model at TP=2 via ``training.step.forward_step``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.objective.logprobs import sequence_stats, token_logprobs
from megatron_amopo.testing import run_multirank
from megatron_amopo.testing.tiny import hand_groups, logprob_inputs, reference_logprobs


def _tp2_full_vocab():
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, labels, mask = logprob_inputs(shape=(3, 9), vocab=40)
    x_ref = logits.clone().requires_grad_(True)
    ref = reference_logprobs(x_ref, labels, mask)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(5))
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), x_ref)
    x = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    logp = token_logprobs(x, labels, dist.group.WORLD, mask=mask, chunk_tokens=4)
    (grad,) = torch.autograd.grad((logp * g).sum(), x)
    x_in = x.detach().clone().requires_grad_(True) * 1  # an op's output, as in training
    logp_in = token_logprobs(x_in, labels, dist.group.WORLD, mask=mask, chunk_tokens=4, inplace_backward=True)
    (grad_in,) = torch.autograd.grad((logp_in * g).sum(), x_in)
    return dict(
        logp_err=(logp - ref).abs().max().item(),
        grad_err=(grad - grad_ref.chunk(world, dim=-1)[rank]).abs().max().item(),
        inplace_same=torch.equal(logp_in, logp) and torch.equal(grad_in, grad),
        inplace_in_logits=grad_in.data_ptr() == x_in.data_ptr(),
    )


def _cp2_reduction():
    """Each rank holds half of every row; the all-reduced stats equal the whole rows',
    and the gradient reaching each rank's partial sums is CP x dL/dstat."""
    import torch.distributed as dist

    rank = dist.get_rank()
    logits, labels, mask = logprob_inputs(shape=(2, 8), vocab=17)
    segments = torch.tensor([[0] * 3 + [1] * 5, [2] * 8])
    whole = sequence_stats(token_logprobs(logits, labels, None, mask=mask), segments, mask, 3)
    cols = slice(4 * rank, 4 * rank + 4)
    part_logp = token_logprobs(logits[:, cols], labels[:, cols], None, mask=mask[:, cols]).requires_grad_(True)
    reduced = sequence_stats(part_logp, segments[:, cols], mask[:, cols], 3, cp_group=dist.group.WORLD)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (reduced.sum_logp * weights).sum().backward()
    err = max((r - w).abs().max().item() for r, w in zip(reduced, whole))
    expected_grad = 2 * weights[segments[:, cols]] * (mask[:, cols] > 0)
    return dict(cp_err=err, cp_grad_err=(part_logp.grad - expected_grad).abs().max().item())


def _padded_vs_packed_on_tiny_model():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_amopo.config import AmopoConfig, ParallelConfig
    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.model.provider import model_provider, transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.testing.tiny import fill_deterministic, tiny_arch
    from megatron_amopo.training.step import forward_step

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize_distributed(parallel)
    set_seed(11)
    arch = tiny_arch("qwen2")
    model = model_provider(arch, transformer_config(arch, parallel), use_te=False)
    fill_deterministic(model, 11, ps.get_tensor_model_parallel_rank(), 2)
    cfg = AmopoConfig(weighting="gaussian", sft_weight=0.3)
    groups = hand_groups(2, 3, arch.vocab_size, seed=21)
    out = {}
    for name, layout, thd in (("padded", "padded", False), ("packed", "packed", False), ("thd", "packed", True)):
        batch = build_micro_batch(groups, layout, seq_length=32, thd=thd)
        model.zero_grad()
        output, loss = forward_step(
            iter([batch]), model, objective_cfg=cfg, tp_group=ps.get_tensor_model_parallel_group(), use_te=False
        )
        loss_sum, count, report = loss(output)
        loss_sum.backward()
        out[name] = dict(
            rows=batch.tokens.shape[0],
            loss=loss_sum.item(),
            count=int(count),
            weights=report.weights,
            pair_sums=report.pair_sums,
            grads={n: p.grad.clone() for n, p in model.named_parameters()},
        )
    # The in-place gradient through the real output layer (ColumnParallelLinear + the transpose of
    # GPTModel's logits) gives the same parameter gradients: nothing there reads the logits again.
    batch = build_micro_batch(groups, "padded", seq_length=32)
    g = torch.randn(batch.labels.shape, generator=torch.Generator().manual_seed(8))
    grads = []
    for inplace in (False, True):
        model.zero_grad()
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
        logp = token_logprobs(
            logits,
            batch.labels,
            ps.get_tensor_model_parallel_group(),
            mask=batch.loss_mask,
            inplace_backward=inplace,
        )
        (logp * g).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    out["inplace_grad_err"] = max((grads[1][n] - t).abs().max().item() for n, t in grads[0].items())
    out["inplace_grad_max"] = min(t.abs().max().item() for t in grads[0].values())
    dist.barrier()
    return out


def _two_rank_body():
    return dict(tp2=_tp2_full_vocab(), cp2=_cp2_reduction(), model=_padded_vs_packed_on_tiny_model())


@pytest.mark.distributed
def test_two_ranks_tp2_cp2_and_padded_vs_packed_model():
    for res in run_multirank(_two_rank_body, 2, timeout=120):
        assert res["tp2"]["logp_err"] <= 1e-5 and res["tp2"]["grad_err"] <= 1e-6, res["tp2"]
        assert res["tp2"]["inplace_same"] and res["tp2"]["inplace_in_logits"], res["tp2"]
        assert res["cp2"]["cp_err"] <= 1e-5 and res["cp2"]["cp_grad_err"] <= 1e-6, res["cp2"]
        padded = res["model"]["padded"]
        assert res["model"]["inplace_grad_max"] > 0 and res["model"]["inplace_grad_err"] == 0, res["model"]
        assert padded["rows"] == 12 and res["model"]["packed"]["rows"] < padded["rows"]  # really packed
        assert res["model"]["thd"]["rows"] == 1  # one stream
        for packed in (res["model"]["packed"], res["model"]["thd"]):
            assert padded["count"] == packed["count"] == 2
            assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
            torch.testing.assert_close(packed["weights"], padded["weights"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(packed["pair_sums"], padded["pair_sums"], rtol=1e-5, atol=1e-5)
            for name, g in padded["grads"].items():
                assert g.abs().max() > 0, name
                err = (packed["grads"][name] - g).abs().max() / g.abs().max()
                assert err <= 1e-5, (name, err.item())
