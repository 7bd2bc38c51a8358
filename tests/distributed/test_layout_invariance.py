"""The same weights and data give the same logits, loss and gradients at every layout.

One spawn of 4 gloo ranks runs TP1/PP1 (DP4), TP2/PP1 (DP2), TP2/PP1 with sequence
parallel, TP1/PP2 (DP2) and TP2/PP2 (DP1) through Megatron-Core's real schedules,
with the global batch split over DP ranks and micro-batches, with the output layer's logits and
with the fused output layer (``training.step``'s wiring). A final run with the gradient wiring
removed shows the test catches its absence.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_amopo.testing import run_multirank

SEED = 7
GLOBAL_BATCH, SEQ, MBS = 8, 16, 2
LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)]


def _global_batch(vocab: int):
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    mask = torch.ones(GLOBAL_BATCH, SEQ)
    mask[:, : SEQ // 4] = 0.0  # prompt-like prefix without loss
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _run_layout(tp, pp, sp, tied, fused, wired=True):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.model.build import build_model
    from megatron_amopo.model.provider import transformer_config
    from megatron_amopo.model.sharding import gather_full, local_parameters, tp_split_dim, unwrap
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.testing.tiny import fill_deterministic, tiny_arch
    from megatron_amopo.training import step
    from megatron_amopo.training.engine import Engine

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
    initialize_distributed(parallel)
    set_seed(SEED)
    arch = tiny_arch("qwen2", tie_word_embeddings=tied)
    config = transformer_config(arch, parallel, calculate_per_token_loss=True)
    (model,) = build_model(arch, config)
    tp_rank, dp_rank, dp = (
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
    )
    fill_deterministic(model, SEED, tp_rank, tp)
    if not wired:
        config.finalize_model_grads_func = None

    tokens, labels, mask = _global_batch(arch.vocab_size)
    per_dp = GLOBAL_BATCH // dp
    rows = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    micro = [
        dict(tokens=tokens[rows][i : i + MBS], labels=labels[rows][i : i + MBS], mask=mask[rows][i : i + MBS])
        for i in range(0, per_dp, MBS)
    ]
    logits_out = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        pos = torch.arange(SEQ).expand_as(batch["tokens"])
        if fused and ps.is_pipeline_last_stage():
            return fused_forward(batch, model, pos)
        output = model(batch["tokens"], pos, None)

        def loss_func(logits):
            logits_out.append(tensor_parallel.gather_from_tensor_model_parallel_region(logits).detach().clone())
            # vocab_parallel_cross_entropy works in place on its input: give it a copy.
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), batch["labels"])
            loss_sum = (losses * batch["mask"]).sum()
            count = batch["mask"].sum().to(torch.int)
            return loss_sum, count, {"loss": torch.stack([loss_sum.detach().clone(), count.float()])}

        return output, loss_func

    def fused_forward(batch, model, pos):
        """The fused output layer as the training step wires it: hidden states and the output weight."""
        gpt = unwrap(model)
        weight = step.output_weight(gpt)
        with step.hidden_states_out(gpt):
            hidden = model(batch["tokens"], pos, None)

        def loss_func(hidden):
            # output_logprobs reads a MicroBatch's labels and loss mask: every position here
            every = SimpleNamespace(labels=batch["labels"], loss_mask=torch.ones_like(batch["mask"]))
            logp = step.output_logprobs(
                every, hidden, tp_group=ps.get_tensor_model_parallel_group(), output_weight=weight, sequence_parallel=sp
            )
            logits_out.append(logp.detach().clone())  # the per-token result compared across layouts
            loss_sum = -(logp * batch["mask"]).sum()
            count = batch["mask"].sum().to(torch.int)
            return loss_sum, count, {"loss": torch.stack([loss_sum.detach().clone(), count.float()])}

        return hidden, loss_func

    reports = Engine([model], forward_step).forward_backward(micro)
    is_last = ps.is_pipeline_last_stage()
    loss_pair = torch.stack([r["loss"] for r in reports]).sum(0) if is_last else torch.zeros(2)
    torch.distributed.all_reduce(loss_pair)  # over everyone; divide out the duplicates below
    loss = (loss_pair[0] / loss_pair[1]).item()

    grads = {full: (p.main_grad, tp_split_dim(p)) for _, full, p in local_parameters(model)}
    if tied and pp > 1:
        grads.pop("output_layer.weight", None)  # the last stage's copy of the embedding
    full_grads = gather_full(grads, ps.get_tensor_model_parallel_group(), ps.get_model_parallel_group())

    payload = (dp_rank, logits_out) if (is_last and tp_rank == 0) else None
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, payload)
    by_dp = {p[0]: torch.cat(p[1]) for p in everyone if p is not None}
    logits = torch.cat([by_dp[d] for d in sorted(by_dp)])
    return dict(loss=loss, logits=logits, grads=full_grads if dp_rank == 0 else None)


def _body(tied: bool, fused: bool):
    from megatron_amopo.runtime.distributed import destroy_distributed  # noqa: F401

    results = {}
    for tp, pp, sp in LAYOUTS:
        results[(tp, pp, sp)] = _run_layout(tp, pp, sp, tied, fused)
    results["unwired"] = _run_layout(1, 1, False, tied, fused, wired=False)
    return results


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.distributed
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-output-layer"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_layouts_give_same_logits_loss_and_grads(tied, fused):
    """Logits, or with the fused output layer the token log-probs, compared across layouts."""
    per_rank = run_multirank(_body, 4, tied, fused, timeout=400)
    res = per_rank[0]
    ref = res[(1, 1, False)]
    assert ref["logits"].shape == ((GLOBAL_BATCH, SEQ) if fused else (GLOBAL_BATCH, SEQ, 512))
    for layout in LAYOUTS[1:]:
        got = res[layout]
        assert (got["logits"] - ref["logits"]).abs().max().item() <= 1e-5, layout
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), layout
        assert set(got["grads"]) == set(ref["grads"]), layout
        for name, g in ref["grads"].items():
            assert g.abs().max() > 0, name  # every parameter really receives gradient
            assert _max_rel(got["grads"][name], g) <= 1e-5, (layout, name)
    # Without finalize_model_grads_func the DP ranks keep unreduced, unscaled grads.
    unwired = res["unwired"]["grads"]
    assert max(_max_rel(unwired[n], g) for n, g in ref["grads"].items()) > 0.1
