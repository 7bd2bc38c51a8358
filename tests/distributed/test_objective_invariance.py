"""The AMoPO objective gives the same loss, pair weights and gradients at every layout.

One spawn of 4 gloo ranks runs the tiny Megatron model with identical weights through
Megatron-Core's real schedules and our ``training.step.forward_step``, with fixed and
with gaussian pair weights (the latter also with the fused output layer), at TP1/PP1 (DP4),
TP2/PP1 (DP2), TP1/PP2 (DP2) and TP2/PP2 (DP1), the 4-sample global batch split as 1 x 4,
2 x 2 and 4 x 1 micro-batches. The same spawn runs a deliberately wrong variant (per-rank
``torch.randn`` draws instead of the counter-based ones), which the check catches,
SimPO with identical chosen and rejected responses, whose loss is
-log sigmoid(-gamma) whatever the weights, and groups with different numbers of masked pairs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from megatron_amopo.data.batch import Group
from megatron_amopo.testing import run_multirank

SEED = 7
NUM_GROUPS, NUM_PAIRS, ROW_LEN = 4, 3, 16
# (TP, PP, micro-batch size in samples); the world has 4 ranks, DP = 4 / (TP x PP).
LAYOUTS = [(1, 1, 1), (2, 1, 2), (2, 1, 1), (1, 2, 1), (2, 2, 4), (2, 2, 2), (2, 2, 1)]
WRONG_LAYOUTS = [(1, 1, 1), (2, 2, 4)]
SANITY_LAYOUT = (2, 2, 2)
CONFIGS = {
    "fixed": dict(weighting="fixed", fixed_weights=[0.5, 0.3, 0.2], sft_weight=0.2),
    "gaussian": dict(weighting="gaussian", sft_weight=0.2),
    "gaussian-fused": dict(weighting="gaussian", sft_weight=0.2, output_layer="fused"),  # no logits tensor
}


# Masked pairs, as --dimension-pairs mirrored writes them where the scores tie (two 2-token sequences, no
# response token): group -> masked pair indices, a different number per group.
MASKED = {1: (2,), 3: (1, 2)}


def _groups(identical_sides: bool = False, masked: bool = False) -> list[Group]:
    """The global batch: groups in the reader's format, random tokens and lengths."""
    gen = torch.Generator().manual_seed(123)
    groups = []
    for g in range(NUM_GROUPS):
        prompt_len = int(torch.randint(3, 6, (1,), generator=gen))
        seqs = []
        for i in range(2 * NUM_PAIRS):
            if identical_sides and i % 2:
                seqs.append(seqs[-1].clone())  # rejected == chosen
                continue
            length = prompt_len + int(torch.randint(2, 8, (1,), generator=gen))
            seqs.append(torch.randint(1, 512, (length,), generator=gen))
        starts = torch.full((2 * NUM_PAIRS,), prompt_len)
        for k in MASKED.get(g, ()) if masked else ():
            seqs[2 * k] = seqs[2 * k + 1] = torch.tensor([7, 7])
            starts[2 * k] = starts[2 * k + 1] = 2
        groups.append(
            Group(
                tokens=seqs,
                response_start=starts,
                chosen_scores=torch.ones(NUM_PAIRS - 1),
                rejected_scores=torch.zeros(NUM_PAIRS - 1),
                row_id=g,
                group_id=1000 + g,
            )
        )
    return groups


def _wrong_loss_func(batch, cfg, logits, *, tp_group):
    """Per-rank stateful draws: what the counter-based normals exist to avoid."""
    from megatron_amopo.objective.amopo import amopo_loss, reduce_for_schedule
    from megatron_amopo.objective.logprobs import sequence_stats, token_logprobs
    from megatron_amopo.training.step import StepReport

    logp = token_logprobs(logits, batch.labels, tp_group, mask=batch.loss_mask)
    stats_BP2 = sequence_stats(logp, batch.segment_ids, batch.loss_mask, batch.num_seqs).pairs(NUM_PAIRS)
    loss_B, metrics = amopo_loss(stats_BP2, cfg, normals=torch.randn(stats_BP2.n.shape))
    loss_sum, count = reduce_for_schedule(loss_B, metrics)
    return loss_sum, count, StepReport.of(loss_sum, count, metrics, batch.sample_ids)


def _wrong_forward_step(data_iterator, model, *, objective_cfg, tp_group):
    from megatron_amopo.training.step import get_batch

    batch = get_batch(data_iterator)
    output = model(batch.tokens, batch.position_ids, batch.attention_mask)
    return output, functools.partial(_wrong_loss_func, batch, objective_cfg, tp_group=tp_group)


def _build(tp, pp):
    from megatron.core import parallel_state as ps

    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.model.build import build_model
    from megatron_amopo.model.provider import transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.testing.tiny import fill_deterministic, tiny_arch

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize_distributed(parallel)
    set_seed(SEED)
    arch = tiny_arch("qwen2")
    config = transformer_config(arch, parallel, calculate_per_token_loss=True)
    (model,) = build_model(arch, config, use_te=False)
    fill_deterministic(model, SEED, ps.get_tensor_model_parallel_rank(), tp)
    return model


def _run(model, mbs, cfg, *, wrong=False, identical_sides=False, masked=False):
    """One global batch through Megatron's schedule at the current layout."""
    from megatron.core import parallel_state as ps

    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.training.engine import Engine
    from megatron_amopo.training.step import bind_forward_step

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_dp = NUM_GROUPS // dp
    mine = _groups(identical_sides, masked)[dp_rank * per_dp : (dp_rank + 1) * per_dp]
    micro = [build_micro_batch(mine[i : i + mbs], "padded", seq_length=ROW_LEN) for i in range(0, per_dp, mbs)]
    if wrong:
        tp_group = ps.get_tensor_model_parallel_group()
        step = functools.partial(_wrong_forward_step, objective_cfg=cfg, tp_group=tp_group)
    else:
        step = bind_forward_step(cfg, use_te=False)
    reports = Engine([model], step).forward_backward(micro)
    return _collect(model, reports)


def _collect(model, reports):
    """Loss (mean over valid samples of the global batch), weights by sample id, full gradients."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_amopo.model.sharding import gather_full, local_parameters, tp_split_dim

    is_last, tp_rank = ps.is_pipeline_last_stage(), ps.get_tensor_model_parallel_rank()
    sums = torch.zeros(2)
    if is_last:
        sums = torch.stack([torch.stack([r.loss_sum, r.count]) for r in reports]).sum(0)
    dist.all_reduce(sums)
    sums /= ps.get_tensor_model_parallel_world_size()  # every TP rank of the last stage reports
    weights = [(r.sample_ids, r.weights) for r in reports] if is_last and tp_rank == 0 else []
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, weights)
    by_id = {int(i): w for part in everyone for ids, ws in part for i, w in zip(ids, ws)}
    grads = {full: (p.main_grad, tp_split_dim(p)) for _, full, p in local_parameters(model)}
    full_grads = gather_full(grads, ps.get_tensor_model_parallel_group(), ps.get_model_parallel_group())
    return dict(
        loss=(sums[0] / sums[1]).item(),
        count=sums[1].item(),
        weights=torch.stack([by_id[k] for k in sorted(by_id)]),
        grads=full_grads if ps.get_data_parallel_rank() == 0 else None,
    )


def _body():
    """Every (weighting, layout, micro-batch size); one model per layout."""
    import torch.distributed as dist

    from megatron_amopo.config import AmopoConfig

    cfgs = {kind: AmopoConfig(**kw) for kind, kw in CONFIGS.items()}
    out = {}
    for tp, pp in dict.fromkeys((tp, pp) for tp, pp, _ in LAYOUTS):
        model = _build(tp, pp)
        for mbs in [m for t, p, m in LAYOUTS if (t, p) == (tp, pp)]:
            for kind, cfg in cfgs.items():
                out[kind, (tp, pp, mbs)] = _run(model, mbs, cfg)
            out["masked", (tp, pp, mbs)] = _run(model, mbs, cfgs["gaussian"], masked=True)
            if (tp, pp, mbs) in WRONG_LAYOUTS:
                out["wrong", (tp, pp, mbs)] = _run(model, mbs, cfgs["gaussian"], wrong=True)
            if (tp, pp, mbs) == SANITY_LAYOUT:
                simpo = AmopoConfig(loss_type="simpo", gamma=2.0, weighting="gaussian")
                out["identical"] = _run(model, mbs, simpo, identical_sides=True)
    return out if dist.get_rank() == 0 else None


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _check_same(got: dict, ref: dict, what) -> None:
    assert got["count"] == ref["count"] == NUM_GROUPS, what
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), what
    assert got["weights"].shape == (NUM_GROUPS, NUM_PAIRS), what
    assert _max_rel(got["weights"], ref["weights"]) <= 1e-5, what
    assert set(got["grads"]) == set(ref["grads"]), what
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, name  # every parameter really receives gradient
        assert _max_rel(got["grads"][name], g) <= 1e-5, (what, name)


@pytest.fixture(scope="module")
def results():
    return run_multirank(_body, 4, timeout=300)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_objective_is_layout_invariant(results, kind):
    ref = results[kind, LAYOUTS[0]]
    assert torch.allclose(ref["weights"].sum(-1), torch.ones(NUM_GROUPS))
    if kind == "fixed":
        assert torch.allclose(ref["weights"], torch.tensor([0.5, 0.3, 0.2]).expand(NUM_GROUPS, -1))
    else:
        assert (ref["weights"] - 1 / NUM_PAIRS).abs().max() > 1e-4  # the draws really move the weights
    for layout in LAYOUTS[1:]:
        _check_same(results[kind, layout], ref, (kind, layout))
    if kind == "gaussian-fused":  # and equal to the logits path
        _check_same(ref, results["gaussian", LAYOUTS[0]], (kind, "vs logits"))


@pytest.mark.distributed
def test_masked_pairs_are_layout_invariant(results):
    """Groups with different numbers of masked pairs: weight 0 there, the same loss, weights and gradients at
    every layout, and a loss that differs from the unmasked batch's (the masks are really applied)."""
    ref = results["masked", LAYOUTS[0]]
    for g, pairs in MASKED.items():
        assert (ref["weights"][g, list(pairs)] == 0).all()
    assert torch.allclose(ref["weights"].sum(-1), torch.ones(NUM_GROUPS))
    for layout in LAYOUTS[1:]:
        _check_same(results["masked", layout], ref, ("masked", layout))
    assert abs(ref["loss"] - results["gaussian", LAYOUTS[0]]["loss"]) > 1e-3


@pytest.mark.distributed
def test_per_rank_stateful_draws_break_invariance(results):
    a, b = (results["wrong", layout] for layout in WRONG_LAYOUTS)
    assert _max_rel(a["weights"], b["weights"]) > 1e-3  # far beyond the 1e-5 tolerance
    with pytest.raises(AssertionError):
        _check_same(b, a, "wrong variant")


@pytest.mark.distributed
def test_identical_chosen_and_rejected_give_softplus_gamma(results):
    # a_c == a_r: every pair loss is -log sigmoid(-gamma) = log(1 + e^gamma), whatever the weights.
    expected = math.log1p(math.exp(2.0))
    assert expected == pytest.approx(2.126928, abs=1e-6)
    assert results["identical"]["loss"] == pytest.approx(expected, rel=1e-6)
