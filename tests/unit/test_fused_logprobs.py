"""``fused_token_logprobs`` (one rank): the log-probs and gradients of ``token_logprobs`` on ``hidden @ weight.T``.

Values and both gradients against the logits path in fp32, bf16 and fp64, a float64 gradcheck,
chunk-size invariance, the flag's parsing and bad inputs. Multi-rank layouts and the model
wiring are in tests/distributed/test_fused_output_layer.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.config import AmopoConfig, add_dataclass_args
from megatron_amopo.objective.fused_logprobs import fused_token_logprobs
from megatron_amopo.objective.logprobs import token_logprobs


def _inputs(dtype=torch.float32, shape=(3, 11), hidden=16, vocab=53, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=gen).to(dtype)
    w = (0.5 * torch.randn(vocab, hidden, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    mask = (torch.rand(shape, generator=gen) > 0.3).float()
    return h, w, labels, mask


def _both(h, w, labels, mask, chunk=4, block=None):
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    out = []
    for fused in (True, False):
        h_, w_ = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if fused:
            logp = fused_token_logprobs(h_, w_, labels, None, mask=mask, chunk_tokens=chunk, vocab_block=block)
        else:
            logp = token_logprobs(h_ @ w_.t(), labels, None, mask=mask, chunk_tokens=chunk)
        (logp * g).sum().backward()
        out.append((logp.detach(), h_.grad, w_.grad))
    return out


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("block", [None, 7], ids=["one-block", "vocab-blocks"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13), (torch.bfloat16, 2e-2)])
def test_equals_the_logits_path(dtype, tol, block):
    (logp, gh, gw), (logp_ref, gh_ref, gw_ref) = _both(*_inputs(dtype), block=block)
    assert logp.dtype == logp_ref.dtype and gh.dtype == gw.dtype == dtype
    assert (logp - logp_ref).abs().max().item() <= tol * max(1.0, logp_ref.abs().max().item())
    assert _rel(gh, gh_ref) <= 10 * tol and _rel(gw, gw_ref) <= 10 * tol
    mask = _inputs(dtype)[3]
    assert (logp[mask == 0] == 0).all() and (gh[mask == 0] == 0).all()  # tokens outside the loss


def test_gradcheck_float64():
    h, w, labels, mask = _inputs(torch.float64, shape=(2, 5), hidden=6, vocab=13)
    h.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_token_logprobs(a, b, labels, None, mask=mask, chunk_tokens=3, vocab_block=4), (h, w)
    )


def test_chunk_size_does_not_change_results():
    h, w, labels, mask = _inputs(torch.float64)
    runs = [_both(h, w, labels, mask, chunk=c, block=b)[0] for c, b in ((1, None), (5, 3), (1000, 1), (1000, None))]
    for logp, gh, gw in runs[1:]:
        assert _rel(logp, runs[0][0]) <= 1e-14 and _rel(gh, runs[0][1]) <= 1e-14 and _rel(gw, runs[0][2]) <= 1e-13


def test_flag_is_generated_with_choices_and_checked():
    import argparse

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, AmopoConfig, "amopo")
    assert getattr(parser.parse_args(["--amopo-output-layer", "fused"]), "AmopoConfig.output_layer") == "fused"
    with pytest.raises(SystemExit):
        parser.parse_args(["--amopo-output-layer", "chunked"])
    with pytest.raises(ValueError, match="--amopo-output-layer"):
        AmopoConfig(output_layer="chunked")


def test_bad_inputs_are_refused():
    h, w, labels, mask = _inputs()
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        fused_token_logprobs(h, w.t(), labels, None)
    with pytest.raises(ValueError, match="share a floating dtype"):
        fused_token_logprobs(h, w.double(), labels, None)
    with pytest.raises(ValueError, match="do not match hidden"):
        fused_token_logprobs(h, w, labels.t(), None)
    with pytest.raises(ValueError, match="label ids must lie"):
        fused_token_logprobs(h, w, labels + 53, None)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_token_logprobs(h, w, labels, None, chunk_tokens=0)
    with pytest.raises(ValueError, match="vocab_block"):
        fused_token_logprobs(h, w, labels, None, vocab_block=0)
