"""Per-group evaluation records and bootstrap intervals (megatron_amopo/evaluation/report.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_amopo.config import AmopoConfig
from megatron_amopo.evaluation import report
from megatron_amopo.objective.amopo import SequenceStats, amopo_loss, reduce_for_schedule, summarize_metrics
from megatron_amopo.training.step import StepReport

PAIRS = ["general", "helpfulness", "verbosity"]


def _stats(a_BP2: torch.Tensor, n_BP2: torch.Tensor) -> SequenceStats:
    p = torch.exp(a_BP2)
    return SequenceStats(a_BP2 * n_BP2, n_BP2, p * n_BP2, p * p * n_BP2)


def _reports(seed: int, sizes=(3, 2)) -> tuple[list[dict], list[dict]]:
    """Real loss_func reports of two micro-batches (one pair with an empty response) and their metrics."""
    gen = torch.Generator().manual_seed(seed)
    reports, metrics_all, start = [], [], 0
    cfg = AmopoConfig(weighting="equal")
    for b in sizes:
        a = -torch.rand(b, len(PAIRS), 2, generator=gen, dtype=torch.float64) * 3
        n = torch.randint(3, 9, (b, len(PAIRS), 2), generator=gen).double()
        if start == 0:
            n[1, 2, 0] = 0  # group 1 has an empty chosen verbosity response
        ids = torch.arange(start, start + b)
        loss_B, metrics = amopo_loss(_stats(a, n), cfg, sample_ids=ids)
        loss_sum, count = reduce_for_schedule(loss_B, metrics)
        reports.append(StepReport.of(loss_sum, count, metrics, ids))
        metrics_all.append(metrics)
        start += b
    return reports, metrics_all


def test_group_records_match_the_aggregate_metrics():
    reports, metrics = _reports(0)
    row_ids = np.arange(100, 105)
    recs = report.group_records(reports, row_ids, PAIRS)
    assert [r["group_id"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["row_id"] for r in recs] == [100, 101, 102, 103, 104]
    assert recs[1]["margin/verbosity"] is None and recs[1]["margin/general"] is not None
    want = summarize_metrics(sum(m["pair_sums"] for m in metrics), sum(m["pair_counts"] for m in metrics), PAIRS)
    for pair in PAIRS:
        acc = report.values(recs, pair, "accuracy")
        margin = report.values(recs, pair, "margin")
        assert len(acc) == (4 if pair == "verbosity" else 5)
        assert math.isclose(np.mean(list(acc.values())), want[f"accuracy/{pair}"], abs_tol=1e-12)
        assert math.isclose(np.mean(list(margin.values())), want[f"margin/{pair}"], abs_tol=1e-12)


def test_mean_ci_constant_and_binomial():
    assert report.mean_ci([0.25] * 30, resamples=500) == (0.25, 0.25, 0.25)
    x = np.r_[np.ones(60), np.zeros(140)]
    mean, lo, hi = report.mean_ci(x, resamples=20000, seed=3)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 200)  # normal approximation of the binomial mean's interval
    assert mean == 0.3 and lo < mean < hi
    assert abs((hi - lo) / 2 - half) < 0.01
    assert report.mean_ci(x, resamples=2000, seed=5) == report.mean_ci(x, resamples=2000, seed=5)
    with pytest.raises(ValueError, match="empty"):
        report.mean_ci([])


def _recs(margins: dict[str, list]) -> list[dict]:
    n = len(next(iter(margins.values())))
    return [{"group_id": g, "row_id": 10 * g, **{f"margin/{p}": v[g] for p, v in margins.items()}} for g in range(n)]


def test_paired_gain_uses_the_change_per_group():
    rng = np.random.default_rng(0)
    before = rng.normal(0, 1, 80)
    b = _recs({"general": list(before)})
    a = _recs({"general": list(before + 0.1)})  # same shift on every prompt: a tight interval despite the spread
    gain, lo, hi, n = report.paired_gain(b, a, "general", "margin", resamples=2000)
    assert n == 80 and math.isclose(gain, 0.1) and math.isclose(lo, 0.1) and math.isclose(hi, 0.1)
    _, ulo, uhi = report.mean_ci(before + 0.1, resamples=2000)
    assert uhi - ulo > 0.3  # the unpaired interval of the level is far wider
    acc_gain = report.paired_gain(
        _recs({"general": [-1, -1, 1, 1]}), _recs({"general": [1, -1, 1, 1]}), "general", "accuracy", resamples=2000
    )
    assert acc_gain[0] == 0.25 and acc_gain[3] == 4


def test_paired_gain_refuses_different_groups_and_skips_missing_pairs():
    b = _recs({"general": [0.1, 0.2, 0.3]})
    other = [dict(r, row_id=r["row_id"] + 1) for r in b]
    with pytest.raises(ValueError, match="different groups"):
        report.paired_gain(b, other, "general", "margin")
    a = _recs({"general": [0.2, None, 0.4]})
    gain, _, _, n = report.paired_gain(b, a, "general", "margin", resamples=500)
    assert n == 2 and math.isclose(gain, 0.1)


def test_summary_table_and_files(tmp_path):
    b = _recs({"general": [-0.2, -0.1, 0.1, -0.3] * 5, "verbosity": [0.1, -0.1, None, 0.2] * 5})
    a = _recs({"general": [0.3, 0.2, 0.5, 0.1] * 5, "verbosity": [0.1, -0.1, None, 0.2] * 5})
    summary = report.summarize_groups(a, resamples=1000)
    assert summary["groups/verbosity"] == 15 and summary["accuracy/general"] == 1.0
    lo, hi = summary["margin_ci95/general"]
    assert lo <= summary["margin/general"] <= hi
    path = str(tmp_path / "g.jsonl")
    report.write_records(path, a)
    assert report.read_records(path) == a
    table = report.comparison_table(b, [("arm", report.read_records(path))], ["general", "verbosity"], 1000)
    lines = table.splitlines()
    assert lines[2].startswith("| untrained | general | 20 | 0.250 [")
    general = next(line for line in lines if line.startswith("| arm | general"))
    verbosity = next(line for line in lines if line.startswith("| arm | verbosity"))
    assert "+0.750 [" in general and general.count("]*") == 2  # both gains exclude zero
    assert "+0.000 [+0.000, +0.000]" in verbosity and "*" not in verbosity
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="not a per-group evaluation file"):
        report.read_records(str(tmp_path / "bad.jsonl"))
