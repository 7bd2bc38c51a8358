"""The fused output layer (``--amopo-output-layer fused``) equals the logits path at every layout.

One spawn of 2 gloo ranks runs the tiny Megatron model through Megatron-Core's real schedule and
``training.step.forward_step`` at TP1 (DP2), TP2, TP2 with sequence parallelism and PP2, tied and
untied, on padded rows, packed rows and the packed THD stream (two micro-batches each), once with
the logits path and once fused, from the same weights. Compared: every token's log-prob, the loss,
and every parameter's gradient after ``finalize_model_grads`` (output weight and, tied, the
embedding included). A fused run fed the wrong weight shows that the comparison can fail.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_amopo.testing import run_multirank

SEED, ROW_LEN, NUM_PAIRS = 5, 24, 2
LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)]  # (TP, PP, sequence parallel)
BATCHES = ("padded", "packed", "thd")


def _recording_step(records: list, wrong_weight: bool, data_iterator, model, **kw):
    """``forward_step`` whose loss function also records the token log-probs and the output's width."""
    from megatron_amopo.training import step

    output, loss = step.forward_step(data_iterator, model, **kw)
    batch, keywords = loss.args[0], dict(loss.keywords)
    if wrong_weight and keywords["output_weight"] is not None:
        keywords["output_weight"] = keywords["output_weight"] * 1.01
        loss = functools.partial(step.loss_func, *loss.args, **keywords)

    def recorded(out):
        logp = step.output_logprobs(
            batch,
            out,
            tp_group=keywords["tp_group"],
            chunk_tokens=keywords["chunk_tokens"],
            output_weight=keywords["output_weight"],
            sequence_parallel=keywords["sequence_parallel"],
        )
        records.append(dict(logp=logp.detach()[batch.loss_mask > 0], width=out.shape[-1]))
        return loss(out)

    return output, recorded


def _run(model, micro, cfg, wrong_weight=False):
    from megatron.core import parallel_state as ps

    from megatron_amopo.training.engine import Engine

    records = []
    step = functools.partial(
        _recording_step,
        records,
        wrong_weight,
        objective_cfg=cfg,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        use_te=False,
        chunk_tokens=7,
    )
    reports = Engine([model], step).forward_backward(micro)
    loss = torch.stack([r.loss_sum for r in reports]).sum() if reports else None
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return dict(loss=loss, grads=grads, logp=[r["logp"] for r in records], width=[r["width"] for r in records])


def _compare(ref: dict, got: dict) -> dict:
    """Largest log-prob difference (absolute) and gradient difference (relative to the tensor's largest)."""
    out = dict(logp=0.0, loss=0.0, grad=0.0, widths=(ref["width"], got["width"]), zero_grads=[])
    for a, b in zip(ref["logp"], got["logp"]):
        out["logp"] = max(out["logp"], (a - b).abs().max().item())
    if ref["loss"] is not None:
        out["loss"] = abs(ref["loss"].item() - got["loss"].item()) / abs(ref["loss"].item())
    for name, g in ref["grads"].items():
        if g.abs().max() == 0:
            out["zero_grads"].append(name)
            continue
        out["grad"] = max(out["grad"], ((got["grads"][name] - g).abs().max() / g.abs().max()).item())
    return out


def _body():
    from megatron.core import parallel_state as ps

    from megatron_amopo.config import AmopoConfig, ParallelConfig
    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.model.build import build_model
    from megatron_amopo.model.provider import transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.testing.tiny import fill_deterministic, hand_groups, tiny_arch
    from megatron_amopo.training.step import seq_pad_multiple

    cfgs = {path: AmopoConfig(weighting="gaussian", sft_weight=0.2, output_layer=path) for path in ("logits", "fused")}
    out = {}
    for tp, pp, sp in LAYOUTS:
        for tied in (False, True):
            parallel = ParallelConfig(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp
            )
            initialize_distributed(parallel)
            set_seed(SEED)
            arch = tiny_arch("qwen2", tie_word_embeddings=tied)
            config = transformer_config(arch, parallel, calculate_per_token_loss=True)
            (model,) = build_model(arch, config, use_te=False)
            config.variable_seq_lengths = True  # packed micro-batches vary in rows and THD streams in length
            fill_deterministic(model, SEED, ps.get_tensor_model_parallel_rank(), tp)
            dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
            mine = hand_groups(4, NUM_PAIRS, arch.vocab_size, seed=17)[dp_rank::dp]
            for kind in BATCHES:
                layout = "padded" if kind == "padded" else "packed"
                feed = dict(thd=kind == "thd", pad_to_multiple=seq_pad_multiple(config))  # as the trainer builds them
                micro = [build_micro_batch(g, layout, ROW_LEN, **feed) for g in ([x] for x in mine)]
                if sp and kind == "packed":  # rows Megatron's sequence split would refuse unpadded
                    raw = [build_micro_batch([x], layout, ROW_LEN).tokens.shape[1] for x in mine]
                    out["odd_rows", tied] = any(w % tp for w in raw)
                runs = {path: _run(model, micro, cfg) for path, cfg in cfgs.items()}
                out[tp, pp, sp, tied, kind] = _compare(runs["logits"], runs["fused"])
            if (tp, pp, sp) == (2, 1, True) and not tied:
                out["wrong"] = _compare(runs["logits"], _run(model, micro, cfgs["fused"], wrong_weight=True))
    return out


@pytest.fixture(scope="module")
def results():
    return run_multirank(_body, 2, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", BATCHES)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp1", "tp2", "tp2-sp", "pp2"])
def test_fused_equals_logits_path(results, layout, tied, kind):
    for rank, res in enumerate(results):
        got = res[(*layout, tied, kind)]
        what = (rank, layout, tied, kind, got)
        hidden = 64  # tiny_arch's hidden size: the fused run's model really handed hidden states
        if got["widths"][0]:
            assert set(got["widths"][0]) == {512 // layout[0]} and set(got["widths"][1]) == {hidden}, what
        assert got["logp"] <= 1e-6 and got["loss"] <= 1e-6, what
        assert got["grad"] <= 1e-5 and not got["zero_grads"], what


@pytest.mark.distributed
def test_sequence_parallel_rows_were_padded(results):
    """The TP2+SP packed-rows case above really had rows whose width TP does not divide."""
    assert any(res["odd_rows", tied] for res in results for tied in (False, True))


@pytest.mark.distributed
def test_a_wrong_weight_is_caught(results):
    assert max(res["wrong"]["logp"] for res in results) > 1e-3
    assert max(res["wrong"]["grad"] for res in results) > 1e-3
