"""Vocab-parallel token log-probs, per-sequence statistics and the step glue.

Single process: values and gradients against log_softmax over the full vocabulary,
a float64 gradcheck, chunk-size invariance, statistics against a per-sequence loop,
the context-parallel split (partial statistics of the parts sum to the whole) and
bad inputs. One spawn of 2 gloo ranks: TP=2 against the full vocabulary, the real CP
all-reduce (forward and backward), and padded vs packed micro-batches through the
real tiny Megatron model at TP=2 via ``training.step.forward_step``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.objective.logprobs import (
    reduce_stats,  # noqa: F401  (exercised on 2 ranks below)
    sequence_stats,
    stats_to_pairs,
    token_logprobs,
)
from megatron_amopo.testing import run_multirank
from megatron_amopo.testing.tiny import hand_groups


def _reference_logprobs(logits, labels, mask):
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return logp * (mask > 0)


def _inputs(seed=0, shape=(3, 11), vocab=53, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    mask = (torch.rand(shape, generator=gen) > 0.3).float()
    return logits, labels, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_full_log_softmax(dtype):
    logits, labels, mask = _inputs(dtype=dtype)
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels, None, mask=mask, chunk_tokens=5)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    x_ref = logits.clone().requires_grad_(True)
    ref = _reference_logprobs(x_ref, labels, mask)
    torch.testing.assert_close(logp, ref, rtol=1e-6, atol=1e-5)
    assert (logp[mask == 0] == 0).all()
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((logp * g).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), x_ref)
    assert grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=0, atol=tol)
    assert (grad[mask == 0] == 0).all()  # tokens outside the loss get no gradient
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_gradcheck_float64():
    logits, labels, mask = _inputs(shape=(2, 5), vocab=13, dtype=torch.float64)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels, None, mask=mask, chunk_tokens=3), (x,))


def test_chunk_size_does_not_change_results():
    logits, labels, mask = _inputs(shape=(4, 25), vocab=97)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for chunk in (1, 3, 7, 64, None):
        x = logits.clone().requires_grad_(True)
        logp = token_logprobs(x, labels, None, mask=mask, chunk_tokens=chunk)
        (grad,) = torch.autograd.grad((logp * g).sum(), x)
        results.append((logp.detach(), grad))
    for logp, grad in results[1:]:
        assert torch.equal(logp, results[0][0])
        assert torch.equal(grad, results[0][1])


def _grads(logits, labels, mask, g, inplace, dtype=None, chunk=4):
    """(log-probs, gradient of sum(g * logp) w.r.t. the logits, the logits' storage afterwards).

    The logits are the output of an op (``leaf * 1``), as the output layer's are in training.
    """
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1
    logp = token_logprobs(x, labels, None, mask=mask, chunk_tokens=chunk, inplace_backward=inplace)
    (grad,) = torch.autograd.grad((logp * g).sum(), x)
    return logp.detach(), grad, x.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_out_of_place(dtype):
    logits, labels, mask = _inputs(shape=(4, 13), vocab=61, dtype=dtype)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    logp, grad, after = _grads(logits, labels, mask, g, inplace=False)
    logp_in, grad_in, after_in = _grads(logits, labels, mask, g, inplace=True)
    assert torch.equal(after, logits)  # out of place: the logits are untouched
    assert torch.equal(logp_in, logp) and torch.equal(grad_in, grad)  # same arithmetic, bit for bit
    assert grad_in.data_ptr() == after_in.data_ptr()  # in place: the gradient is the logits' storage
    assert torch.equal(after_in, grad) and not torch.equal(after_in, logits)


def test_inplace_backward_refuses_unsafe_uses():
    logits, labels, mask = _inputs()
    with pytest.raises(ValueError, match="would overwrite a leaf tensor"):
        token_logprobs(logits.clone().requires_grad_(True), labels, None, mask=mask, inplace_backward=True)
    with pytest.raises(ValueError, match="or a view of one"):
        token_logprobs(logits.clone().requires_grad_(True)[1:], labels[1:], None, inplace_backward=True)
    x = logits.clone().requires_grad_(True) * 1
    logp = token_logprobs(x, labels, None, mask=mask, inplace_backward=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same log-probs"):
        logp.sum().backward()
    # A second consumer that saved the logits before them and runs its backward after: autograd's
    # version counter catches the overwritten logits instead of letting it read the gradient.
    x = logits.clone().requires_grad_(True) * 1
    other = (x**2).sum()
    logp = token_logprobs(x, labels, None, mask=mask, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


def test_inplace_backward_with_a_consumer_that_runs_first_stays_exact():
    """A consumer recorded after the log-probs runs its backward first (autograd's order), so it
    still reads the logits; the summed gradient equals the out-of-place one."""
    logits, labels, mask = _inputs(shape=(3, 7), vocab=29)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1
        logp = token_logprobs(x, labels, None, mask=mask, inplace_backward=inplace)
        (logp.sum() + (x**2).sum()).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_sequence_stats_match_a_per_sequence_loop():
    gen = torch.Generator().manual_seed(3)
    logp = -torch.rand(2, 12, generator=gen) * 4
    segments = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [2] * 7 + [3] * 5])
    mask = ((torch.rand(2, 12, generator=gen) > 0.25) & (segments >= 0)).float()
    mask[1, 7:] = 0  # sequence 3 has no response token
    stats = sequence_stats(logp, segments, mask, num_seqs=4)
    for n in range(4):
        sel = (segments == n) & (mask > 0)
        p = logp[sel].exp()
        expected = (logp[sel].sum(), sel.sum().float(), p.sum(), (p * p).sum())
        got = tuple(stats[k][n] for k in ("sum_logp", "n", "sum_p", "sum_p2"))
        torch.testing.assert_close(torch.stack(got), torch.stack(expected))
    assert stats["n"][3] == 0 and stats["sum_logp"][3] == 0


def test_context_parallel_parts_sum_to_the_whole():
    """Megatron's CP split (chunks r and 2 CP - 1 - r of each row on rank r): the
    partial statistics of the CP ranks sum to the statistics of the whole rows."""
    logits, labels, mask = _inputs(shape=(2, 16), vocab=31)
    segments = torch.tensor([[0] * 6 + [1] * 10, [2] * 9 + [3] * 7])
    whole = sequence_stats(token_logprobs(logits, labels, None, mask=mask), segments, mask, 4)
    cp = 2
    chunks = torch.arange(16).view(2 * cp, -1)
    total = {k: torch.zeros(4) for k in whole}
    for r in range(cp):
        cols = torch.cat([chunks[r], chunks[2 * cp - 1 - r]])
        part = sequence_stats(
            token_logprobs(logits[:, cols], labels[:, cols], None, mask=mask[:, cols]),
            segments[:, cols],
            mask[:, cols],
            4,
        )
        assert not torch.allclose(part["n"], whole["n"])  # each part really is partial
        total = {k: total[k] + part[k] for k in total}
    for k in whole:
        torch.testing.assert_close(total[k], whole[k], rtol=1e-6, atol=1e-6)


def test_stats_to_pairs_layout():
    stats = {"n": torch.arange(12.0)}
    n_BPS = stats_to_pairs(stats, num_pairs=3)["n"]
    assert n_BPS.shape == (2, 3, 2)
    assert n_BPS[1, 2, 1] == 1 * 6 + 2 * 2 + 1  # n = b * 2P + 2k + side
    with pytest.raises(ValueError, match="not a multiple of 2P = 10"):
        stats_to_pairs(stats, num_pairs=5)


def test_bad_inputs_are_refused():
    logits, labels, mask = _inputs()
    with pytest.raises(ValueError, match="do not match logits"):
        token_logprobs(logits, labels[:, :-1], None)
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 53\)"):
        token_logprobs(logits, labels + 53, None, mask=torch.ones_like(mask))
    with pytest.raises(ValueError, match="mask shape"):
        token_logprobs(logits, labels, None, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        token_logprobs(logits, labels, None, chunk_tokens=0)
    segments = torch.zeros_like(labels)
    segments[0, 0] = -1
    with pytest.raises(ValueError, match="response token on padding"):
        sequence_stats(torch.zeros(labels.shape), segments, torch.ones(labels.shape), 1)


def test_step_glue_refuses_incomplete_batches_and_sends_packed_rows_to_te_as_thd():
    from megatron_amopo.training.step import get_batch, packed_rows, packed_to_thd

    with pytest.raises(KeyError, match="lacks"):
        get_batch(iter([{"tokens": torch.zeros(1, 4)}]))
    packed = {"segment_ids": torch.tensor([[0, 0, 1, 1, -1]])}
    padded = {"segment_ids": torch.tensor([[0, 0, 0, -1, -1], [1, 1, -1, -1, -1]])}
    assert packed_rows(packed) and not packed_rows(padded)
    assert packed_to_thd(packed, thd=False)[1] is None  # the local spec applies the mask itself
    assert packed_to_thd(padded, thd=True)[1] is None  # one sequence per row: causal is exact
    tokens = torch.arange(5)[None]
    full = dict(
        packed,
        tokens=tokens,
        labels=tokens,
        loss_mask=torch.tensor([[1.0, 1, 1, 1, 0]]),
        position_ids=torch.tensor([[0, 1, 0, 1, 0]]),
        attention_mask=None,
        cu_seqlens=torch.tensor([[0, 2, 4]]),
        num_seqs=torch.tensor(2),
    )
    thd, params = packed_to_thd(full, thd=True)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 2, 4]
    assert thd["tokens"].shape == (1, 4)


# ---------------------------------------------------------------------------
# Two ranks


def _tp2_full_vocab():
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, labels, mask = _inputs(shape=(3, 9), vocab=40)
    x_ref = logits.clone().requires_grad_(True)
    ref = _reference_logprobs(x_ref, labels, mask)
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
    logits, labels, mask = _inputs(shape=(2, 8), vocab=17)
    segments = torch.tensor([[0] * 3 + [1] * 5, [2] * 8])
    whole = sequence_stats(token_logprobs(logits, labels, None, mask=mask), segments, mask, 3)
    cols = slice(4 * rank, 4 * rank + 4)
    part_logp = token_logprobs(logits[:, cols], labels[:, cols], None, mask=mask[:, cols]).requires_grad_(True)
    reduced = sequence_stats(part_logp, segments[:, cols], mask[:, cols], 3, cp_group=dist.group.WORLD)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (reduced["sum_logp"] * weights).sum().backward()
    err = max((reduced[k] - whole[k]).abs().max().item() for k in whole)
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
    for layout in ("padded", "packed"):
        batch = build_micro_batch(groups, layout, seq_length=32)
        model.zero_grad()
        output, loss = forward_step(
            iter([batch]), model, objective_cfg=cfg, tp_group=ps.get_tensor_model_parallel_group(), use_te=False
        )
        loss_sum, count, report = loss(output)
        loss_sum.backward()
        out[layout] = dict(
            rows=batch["tokens"].shape[0],
            loss=loss_sum.item(),
            count=int(count),
            weights=report["weights"],
            pair_sums=report["pair_sums"],
            grads={n: p.grad.clone() for n, p in model.named_parameters()},
        )
    # The in-place gradient through the real output layer (ColumnParallelLinear + the transpose of
    # GPTModel's logits) gives the same parameter gradients: nothing there reads the logits again.
    batch = build_micro_batch(groups, "padded", seq_length=32)
    g = torch.randn(batch["labels"].shape, generator=torch.Generator().manual_seed(8))
    grads = []
    for inplace in (False, True):
        model.zero_grad()
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        logp = token_logprobs(
            logits,
            batch["labels"],
            ps.get_tensor_model_parallel_group(),
            mask=batch["loss_mask"],
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
        padded, packed = res["model"]["padded"], res["model"]["packed"]
        assert res["model"]["inplace_grad_max"] > 0 and res["model"]["inplace_grad_err"] == 0, res["model"]
        assert padded["rows"] == 12 and packed["rows"] < padded["rows"]  # really packed
        assert padded["count"] == packed["count"] == 2
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        torch.testing.assert_close(packed["weights"], padded["weights"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed["pair_sums"], padded["pair_sums"], rtol=1e-5, atol=1e-5)
        for name, g in padded["grads"].items():
            assert g.abs().max() > 0, name
            err = (packed["grads"][name] - g).abs().max() / g.abs().max()
            assert err <= 1e-5, (name, err.item())
