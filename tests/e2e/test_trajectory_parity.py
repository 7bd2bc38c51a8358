"""Training-trajectory parity: pretrain_amopo.py against a plain torch loop on a Hugging Face model.

The loop shares none of our trainer: a transformers Qwen2 model loaded from the tiny HF directory that
tools/convert_hf_to_megatron.py converted for the trainer; log-probs from the full log-softmax of each
sequence on its own; the SimPO pair loss with equal weights over the valid pairs written out here (paper
formula, --amopo-pair-reduction sum); the global-batch loss as the mean over valid samples; torch AdamW
with no weight decay on 1-D tensors (Megatron's rule: biases and norms); linear warm-up from 0 then
cosine to --min-lr written from the definition (checked against Megatron's scheduler below); the global
gradient norm clipped by max_norm / (norm + 1e-6). It takes the same groups per step as the trainer's data
plan (megatron_amopo.training.batches.make_plan over the DP ranks: the data order is not under test).

The model is tiny (hidden 32, 2 layers) and so is its vocabulary: the real Qwen2 tokenizer shrunk to its
first 1024 tokens (make_tiny_model.py --tokenizer-size), so that a step costs milliseconds, not a
150k-way softmax per token.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from megatron_amopo.data.batch import Group
from megatron_amopo.testing.pipeline import PY, run_tool, run_torchrun, tiny_qwen2_setup, write_shortest_rows

SEQ, STEPS, GBS, VOCAB, PROMPTS = 256, 10, 4, 1024, 32
LR, MIN_LR, WARMUP, WD, CLIP, BETA, GAMMA = 1e-3, 1e-4, 0.25, 0.1, 5.0, 2.0, 0.5
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The PROMPTS shortest HelpSteer2 prompts (two responses each), preprocessed at SEQ."""
    root = tmp_path_factory.mktemp("parity")
    write_shortest_rows(root / "rows.jsonl", PROMPTS)
    tiny_qwen2_setup(root, root / "rows.jsonl", SEQ, vocab=VOCAB)
    return root


def train_flags(setup, save, *layout: str) -> list[str]:
    return [
        "--load", str(setup / "init"), "--save", str(save), "--data-path", str(setup / "data"),
        "--micro-batch-size", "1", "--global-batch-size", str(GBS), "--train-iters", str(STEPS),
        "--seq-length", str(SEQ), "--lr", str(LR), "--min-lr", str(MIN_LR), "--lr-decay-style", "cosine",
        "--lr-warmup-fraction", str(WARMUP), "--weight-decay", str(WD), "--clip-grad", str(CLIP),
        "--amopo-loss", "simpo", "--amopo-beta", str(BETA), "--amopo-gamma", str(GAMMA),
        "--amopo-weighting", "equal", "--no-memory-check", *layout,
    ]  # fmt: skip


def step_groups(setup, dp_size: int) -> tuple[tuple[int, ...], ...]:
    """The group ids of each step, over all DP ranks (the trainer's plan; TP/PP ranks share it)."""
    from megatron_amopo.config import TrainDataConfig, TrainingConfig
    from megatron_amopo.training import batches

    tc = TrainingConfig(micro_batch_size=1, global_batch_size=GBS, train_iters=STEPS, seq_length=SEQ)
    split, _ = batches.open_splits(TrainDataConfig(data_path=str(setup / "data")), tc.seed, None, SEQ)
    per_step = tc.microbatches_per_step(dp_size)
    one = batches.make_plan(split, tc, num_epochs=1, seed=tc.seed, dp_rank=0, dp_size=dp_size)
    epochs = math.ceil(STEPS / (one.num_microbatches // per_step))
    plans = [
        batches.make_plan(split, tc, num_epochs=epochs, seed=tc.seed, dp_rank=r, dp_size=dp_size)
        for r in range(dp_size)
    ]
    return tuple(
        tuple(int(g) for p in plans for m in range(s * per_step, (s + 1) * per_step) for g in p.microbatch(m))
        for s in range(STEPS)
    )


def lr_at(done: int) -> float:
    """Linear warm-up from 0 over floor(WARMUP * STEPS) steps, then cosine from LR to MIN_LR; ``done`` steps taken."""
    warm = math.floor(WARMUP * STEPS)
    if warm and done <= warm:
        return LR * done / warm
    ratio = (done - warm) / (STEPS - warm)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (LR - MIN_LR)


def mean_response_logp(model, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
    """(mean log-prob of the response tokens, their number): label j (token j+1) counts when j+1 >= start."""
    logits = model(tokens[None, :-1]).logits[0]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[1:, None]).squeeze(-1)
    mask = torch.arange(1, len(tokens)) >= start
    n = int(mask.sum())
    return (logp[mask].sum() / max(n, 1)), n


def group_loss(model, group: Group) -> tuple[torch.Tensor, bool]:
    """(SimPO averaged over the valid pairs, whether any pair is valid): equal weights 1/P_valid sum to one."""
    out = [mean_response_logp(model, seq.long(), int(s)) for seq, s in zip(group.tokens, group.response_start)]
    losses = []
    for k in range(len(out) // 2):
        (a_c, n_c), (a_r, n_r) = out[2 * k], out[2 * k + 1]
        if n_c and n_r:  # a pair counts when both responses keep a token
            losses.append(-torch.nn.functional.logsigmoid(BETA * (a_c - a_r) - GAMMA))
    if not losses:
        return torch.zeros((), dtype=torch.float64), False
    return torch.stack(losses).mean(), True


@functools.lru_cache(maxsize=4)  # the layouts' plans may give the same steps: one loop serves both
def reference_run(setup, steps: tuple[tuple[int, ...], ...], lr_shift: int = 0):
    """The plain loop, in float64 (the exact trajectory the trainer's fp32 approximates): per-step loss and
    gradient norm, and the final weights. ``lr_shift`` moves the schedule by that many steps (a one-step
    schedule error, to size the weight tolerance)."""
    from transformers import AutoModelForCausalLM

    from megatron_amopo.data.reader import PreferenceGroupDataset

    model = AutoModelForCausalLM.from_pretrained(str(setup / "hf"), dtype=torch.float64)
    model.train()  # no dropout in Qwen2
    ds = PreferenceGroupDataset(str(setup / "data"))
    params = [p for p in model.parameters() if p.requires_grad]  # the tied embedding once
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": WD},
        {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    losses, norms = [], []
    for s, ids in enumerate(steps):
        opt.zero_grad()
        per_group = [group_loss(model, ds[g]) for g in ids]
        valid = [loss for loss, ok in per_group if ok]
        loss = torch.stack(valid).sum() / len(valid)  # mean over valid samples of the global batch
        loss.backward()
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
        coeff = CLIP / (norm + 1e-6)
        if coeff < 1.0:
            for p in params:
                p.grad.mul_(coeff)
        for g in opt.param_groups:
            g["lr"] = lr_at(s + lr_shift)
        opt.step()
        losses.append(loss.item())
        norms.append(norm)
    return losses, norms, {k: v.detach().float() for k, v in model.state_dict().items()}


def trainer_log(save) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    by_iter = {r["iteration"]: r for r in rows if r["kind"] == "train"}
    return [by_iter[i]["loss"] for i in range(1, STEPS + 1)], [by_iter[i]["grad_norm"] for i in range(1, STEPS + 1)]


def exported_weights(setup, save, name: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    out = setup / name
    run_tool([PY, "tools/convert_megatron_to_hf.py", "--load", str(save), "--save", str(out)])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def weight_distance(a: dict, b: dict) -> float:
    """max over tensors of max |a - b| / max |b|."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize(
    "name,nproc,layout,dp",
    [
        ("tp1_dp2", 2, [], 2),
        ("tp2_pp2", 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 1),
    ],
)
def test_trainer_follows_a_plain_torch_loop(setup, name, nproc, layout, dp):
    save = setup / name
    run_torchrun("pretrain_amopo.py", *train_flags(setup, save, *layout), nproc=nproc, timeout=1000)
    ours, our_norms = trainer_log(save)
    steps = step_groups(setup, dp)
    ref, ref_norms, ref_weights = reference_run(setup, steps)
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
    rel_norm = max(abs(a - b) / b for a, b in zip(our_norms, ref_norms))
    print(f"{name}: per-step loss rel. diff {' '.join(f'{r:.1e}' for r in rel)}, max {max(rel):.2e}")
    print(f"{name}: grad norm rel. diff max {rel_norm:.2e}")
    print(f"{name}: losses {ours[0]:.5f} -> {ours[-1]:.5f}; grad norms {' '.join(f'{n:.3g}' for n in ref_norms)}")
    assert max(rel) < 1e-5, list(zip(ours, ref))
    assert rel_norm < 1e-5, list(zip(our_norms, ref_norms))
    # It trained (mean loss 1.21 over the first five steps, 0.60 over the last five, which revisit the same
    # 20 groups), and clipping acted on some steps and not others: not a comparison of two idle runs.
    half = STEPS // 2
    assert sum(ours[half:]) / half < sum(ours[:half]) / half - 0.25, ours
    assert any(n > CLIP for n in ref_norms) and any(n < CLIP for n in ref_norms)

    got = weight_distance(exported_weights(setup, save, name + "_hf"), ref_weights)
    # The bound: a tenth of what the smallest rule error we can think of does to the weights, the
    # schedule off by one step (measured on the loop itself), so that no such error fits under it.
    _, _, shifted = reference_run(setup, steps, lr_shift=1)
    one_step_off = weight_distance(shifted, ref_weights)
    print(f"{name}: exported weights vs the loop's, max |diff| / max |w| per tensor: {got:.2e}; "
          f"schedule one step off: {one_step_off:.2e}")  # fmt: skip
    assert got < one_step_off / 10


def test_lr_rule_matches_the_scheduler():
    """The loop's schedule, written from the definition, against Megatron's OptimizerParamScheduler as
    training/optimizer.py builds it (a fake optimizer with one param group)."""
    from megatron_amopo.config import OptimizerConfig
    from megatron_amopo.training.optimizer import build_scheduler

    fake = type("Opt", (), {"param_groups": [{"lr": 0.0, "weight_decay": 0.0}]})()
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_warmup_fraction=WARMUP, weight_decay=WD)
    sched = build_scheduler(fake, cfg, STEPS, GBS)
    for done in range(STEPS):
        assert fake.param_groups[0]["lr"] == pytest.approx(lr_at(done), rel=1e-12, abs=1e-15)
        sched.step(increment=GBS)
