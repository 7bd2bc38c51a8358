"""Vocab-parallel token log-probs, per-sequence statistics and the step glue.

Single process: values and gradients against log_softmax over the full vocabulary,
a float64 gradcheck, chunk-size invariance, statistics against a per-sequence loop,
the context-parallel split (partial statistics of the parts sum to the whole) and
bad inputs. On 2 gloo ranks: tests/distributed/test_logprobs_ranks.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.objective.amopo import SequenceStats
from megatron_amopo.objective.logprobs import sequence_stats, token_logprobs
from megatron_amopo.testing.tiny import logprob_inputs, reference_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_match_full_log_softmax(dtype):
    logits, labels, mask = logprob_inputs(dtype=dtype)
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels, None, mask=mask, chunk_tokens=5)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    x_ref = logits.clone().requires_grad_(True)
    ref = reference_logprobs(x_ref, labels, mask)
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
    logits, labels, mask = logprob_inputs(shape=(2, 5), vocab=13, dtype=torch.float64)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels, None, mask=mask, chunk_tokens=3), (x,))


def test_chunk_size_does_not_change_results():
    logits, labels, mask = logprob_inputs(shape=(4, 25), vocab=97)
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
    logits, labels, mask = logprob_inputs(shape=(4, 13), vocab=61, dtype=dtype)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    logp, grad, after = _grads(logits, labels, mask, g, inplace=False)
    logp_in, grad_in, after_in = _grads(logits, labels, mask, g, inplace=True)
    assert torch.equal(after, logits)  # out of place: the logits are untouched
    assert torch.equal(logp_in, logp) and torch.equal(grad_in, grad)  # same arithmetic, bit for bit
    assert grad_in.data_ptr() == after_in.data_ptr()  # in place: the gradient is the logits' storage
    assert torch.equal(after_in, grad) and not torch.equal(after_in, logits)


def test_inplace_backward_refuses_unsafe_uses():
    logits, labels, mask = logprob_inputs()
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
    logits, labels, mask = logprob_inputs(shape=(3, 7), vocab=29)
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
        got = tuple(t[n] for t in stats)
        torch.testing.assert_close(torch.stack(got), torch.stack(expected))
    assert isinstance(stats, SequenceStats) and stats.n[3] == 0 and stats.sum_logp[3] == 0


def test_context_parallel_parts_sum_to_the_whole():
    """Megatron's CP split (chunks r and 2 CP - 1 - r of each row on rank r): the
    partial statistics of the CP ranks sum to the statistics of the whole rows."""
    logits, labels, mask = logprob_inputs(shape=(2, 16), vocab=31)
    segments = torch.tensor([[0] * 6 + [1] * 10, [2] * 9 + [3] * 7])
    whole = sequence_stats(token_logprobs(logits, labels, None, mask=mask), segments, mask, 4)
    cp = 2
    chunks = torch.arange(16).view(2 * cp, -1)
    total = [torch.zeros(4) for _ in whole]
    for r in range(cp):
        cols = torch.cat([chunks[r], chunks[2 * cp - 1 - r]])
        part = sequence_stats(
            token_logprobs(logits[:, cols], labels[:, cols], None, mask=mask[:, cols]),
            segments[:, cols],
            mask[:, cols],
            4,
        )
        assert not torch.allclose(part.n, whole.n)  # each part really is partial
        total = [t + p for t, p in zip(total, part)]
    for t, w in zip(total, whole):
        torch.testing.assert_close(t, w, rtol=1e-6, atol=1e-6)


def test_stats_pairs_layout():
    stats = SequenceStats(*(torch.arange(12.0) for _ in SequenceStats._fields))
    n_BP2 = stats.pairs(num_pairs=3).n
    assert n_BP2.shape == (2, 3, 2)
    assert n_BP2[1, 2, 1] == 1 * 6 + 2 * 2 + 1  # n = b * 2P + 2k + side
    with pytest.raises(ValueError, match="not a multiple of 2P = 10"):
        stats.pairs(num_pairs=5)


def test_bad_inputs_are_refused():
    logits, labels, mask = logprob_inputs()
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
