"""The trainer's per-step reduction on 4 gloo ranks (TP2 x DP2): one all-reduce gives the same
numbers as the former three (report sums, counts, MAX of the stop flag), picks one report copy
per DP replica, and stops every rank when one got the signal.

Reports come from the real objective (``amopo_loss`` -> ``reduce_for_schedule`` -> ``StepReport.of``)
and batches from the real micro-batch builder.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_amopo.testing import run_multirank

pytestmark = pytest.mark.distributed
NUM_PAIRS, MICROBATCHES = 3, 3


def _batches_and_reports(dp_rank: int, tp_rank: int) -> tuple[list, list]:
    from megatron_amopo.config import AmopoConfig
    from megatron_amopo.data.batch import Group, build_micro_batch
    from megatron_amopo.objective.amopo import SequenceStats, amopo_loss, reduce_for_schedule
    from megatron_amopo.training.step import StepReport

    gen = torch.Generator().manual_seed(100 + dp_rank)
    batches, reports = [], []
    for m in range(MICROBATCHES):
        groups = []
        for g in range(m + 1):  # micro-batches of 1, 2, 3 groups
            seqs = [
                torch.randint(1, 500, (int(torch.randint(4, 20, (1,), generator=gen)),), generator=gen)
                for _ in range(2 * NUM_PAIRS)
            ]
            groups.append(
                Group(
                    tokens=seqs,
                    response_start=torch.full((2 * NUM_PAIRS,), 2),
                    chosen_scores=torch.rand(NUM_PAIRS - 1, generator=gen) * 4,
                    rejected_scores=torch.rand(NUM_PAIRS - 1, generator=gen) * 4,
                    row_id=g,
                    group_id=10 * dp_rank + m + g,
                )
            )
        batch = build_micro_batch(groups, "packed", seq_length=64)
        B = len(groups)
        n = torch.randint(0, 6, (B, NUM_PAIRS, 2), generator=gen).double()  # some pairs invalid (n = 0)
        sum_logp = -torch.rand(B, NUM_PAIRS, 2, generator=gen, dtype=torch.float64) * n * 3
        p = torch.exp(sum_logp / n.clamp(min=1))
        stats = SequenceStats(sum_logp, n, p * n, p * p * n)
        loss_B, metrics = amopo_loss(stats, AmopoConfig(weighting="mean"), sample_ids=batch.sample_ids)
        loss_sum, count = reduce_for_schedule(loss_B, metrics)
        report = StepReport.of(loss_sum, count, metrics, batch.sample_ids)
        if tp_rank == 1:  # a non-reporting copy must not count: make it differ
            report = dataclasses.replace(
                report,
                **{
                    f.name: getattr(report, f.name) + 1000 for f in dataclasses.fields(report) if f.name != "sample_ids"
                },
            )
        batches.append(batch)
        reports.append(report)
    return batches, reports


def _former_reduction(reports, batches, reporting: bool, num_rows: int, stop: bool) -> dict:
    """The reductions as the trainer did them before: three all-reduces, Python float sums."""
    import torch.distributed as dist

    flat = torch.zeros(2 + num_rows * NUM_PAIRS + NUM_PAIRS, dtype=torch.float64)
    if reporting and reports:
        flat[0] = sum(float(r.loss_sum) for r in reports)
        flat[1] = sum(float(r.count) for r in reports)
        flat[2 : 2 + num_rows * NUM_PAIRS] = sum(r.pair_sums.double().cpu() for r in reports).flatten()
        flat[2 + num_rows * NUM_PAIRS :] = sum(r.pair_counts.double().cpu() for r in reports)
    dist.all_reduce(flat)
    counts = torch.zeros(2, dtype=torch.float64)
    if reporting:
        counts[0] = sum(len(b.sample_ids) for b in batches)
        counts[1] = sum(int((b.segment_ids >= 0).sum()) for b in batches)
    dist.all_reduce(counts)
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return dict(
        loss_sum=flat[0].item(),
        count=flat[1].item(),
        pair_sums=flat[2 : 2 + num_rows * NUM_PAIRS],
        pair_counts=flat[2 + num_rows * NUM_PAIRS :],
        groups=counts[0].item(),
        tokens=counts[1].item(),
        stop=bool(flag.item()),
    )


def _check_on_rank() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.objective.amopo import PAIR_METRIC_NAMES
    from megatron_amopo.runtime.distributed import initialize_distributed
    from megatron_amopo.testing.tiny import tiny_arch
    from megatron_amopo.training.engine import Engine, is_reporting_rank
    from megatron_amopo.training.throughput import training_flops

    initialize_distributed(ParallelConfig(tensor_model_parallel_size=2))
    rank, arch, num_rows = dist.get_rank(), tiny_arch(), len(PAIR_METRIC_NAMES)
    batches, reports = _batches_and_reports(ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    out = {}
    for step, stop in enumerate((False, rank == 3)):  # at the second step only rank 3 got the signal
        calls = []
        real_all_reduce = dist.all_reduce

        def counting(*args, **kwargs):
            calls.append(args[0].device.type)
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting
        try:
            new = Engine([], forward_step=lambda *_: None).reduce(reports, batches, NUM_PAIRS, stop=stop, arch=arch)
        finally:
            dist.all_reduce = real_all_reduce
        old = _former_reduction(reports, batches, is_reporting_rank(), num_rows, stop)
        for key in ("loss_sum", "count", "groups", "tokens"):
            assert getattr(new, key) == old[key], (key, getattr(new, key), old[key])  # bit-identical
        assert torch.equal(new.pair_sums.flatten(), old["pair_sums"])
        assert torch.equal(new.pair_counts, old["pair_counts"])
        assert (new.stop > 0) == old["stop"]
        out[f"stop_{step}"] = new.stop > 0
        out["all_reduces"] = calls
    # FLOPs: the sum over the two DP replicas of the training FLOPs of their sequences
    mine = training_flops(arch, [n for b in batches for n in b.seq_lengths])
    both = torch.tensor([mine if is_reporting_rank() else 0.0], dtype=torch.float64)
    dist.all_reduce(both)
    assert new.flops == both.item() > 0
    out["loss"] = new.loss
    return out


def test_one_all_reduce_per_step_same_numbers_and_shared_stop():
    results = run_multirank(_check_on_rank, 4)
    assert all(r["all_reduces"] == ["cpu"] for r in results)  # one host-side all-reduce per step
    assert not any(r["stop_0"] for r in results)
    assert all(r["stop_1"] for r in results)  # rank 3's signal reached every rank
    assert len({r["loss"] for r in results}) == 1
