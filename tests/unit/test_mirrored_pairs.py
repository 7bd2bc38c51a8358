"""Mirrored dimension pairs (--dimension-pairs mirrored) on real HelpSteer2 rows and the real Qwen2
tokenizer: layout, masking, metadata, refusals, and steerability measured through the objective and the
evaluation report on constructed scoring models (one that ignores the dimension prompt, one that follows it)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_amopo.config import AmopoConfig
from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.data.preprocess import preprocess
from megatron_amopo.data.reader import PreferenceGroupDataset
from megatron_amopo.evaluation import report
from megatron_amopo.objective.amopo import SequenceStats, amopo_loss, reduce_for_schedule, summarize_metrics
from megatron_amopo.objective.pairs import mirrored_name
from megatron_amopo.runtime.errors import EmptyOutput
from megatron_amopo.training.step import StepReport

ROOT = Path(__file__).resolve().parents[2]
HS2 = str(ROOT / "data" / "helpsteer2" / "train_rows.jsonl")
TOK = str(ROOT / "data" / "tokenizer-qwen2")
DIMS = ["helpfulness", "verbosity"]
PAIRS = ["general", "helpfulness", "verbosity", "helpfulness~mirrored", "verbosity~mirrored"]


def _preprocess(out: Path, pairs: str, dims=DIMS, inp=HS2, fmt="helpsteer2", limit=80) -> dict:
    pre = PreprocessConfig(input=inp, output=str(out), tokenizer=TOK, limit=limit, progress=False)
    data = DataConfig(format=fmt, dimensions=list(dims), seq_length=768, dimension_pairs=pairs)
    return preprocess(data, PromptConfig(), pre)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirrored")
    meta = _preprocess(root / "mirrored", "mirrored")
    _preprocess(root / "paper", "paper")
    return meta, PreferenceGroupDataset(str(root / "mirrored")), PreferenceGroupDataset(str(root / "paper"))


def _decode(tok, ids) -> str:
    return tok.decode(ids.tolist())


def _stated_score(tok, seq, start) -> float:
    found = re.findall(r"deserves a score of ([0-9.]+)\.", _decode(tok, seq[:start]))
    assert len(found) == 1
    return float(found[0])


def test_layout_masks_and_metadata(mirrored):
    from transformers import AutoTokenizer

    meta, ds, paper = mirrored
    tok = AutoTokenizer.from_pretrained(TOK)
    assert meta["pair_names"] == ds.pair_names == PAIRS and meta["num_pairs"] == 5 and ds.dimension_pairs == "mirrored"
    assert paper.pair_names == PAIRS[:3] and paper.num_pairs == 3  # the paper's construction stays the default
    assert len(ds) == len(paper) > 20 and (ds.row_ids_G == paper.row_ids_G).all()
    differ_GD = ds.chosen_scores_GD != ds.rejected_scores_GD
    assert meta["counts"]["mirrored_pairs"] == {d: int(differ_GD[:, k].sum()) for k, d in enumerate(DIMS)}
    assert 0 < differ_GD.sum() < differ_GD.size  # some pairs are masked, some are not
    for g in range(len(ds)):
        item, ref = ds[g], paper[g]
        seqs, starts = item.tokens, item.response_start
        for n in range(6):  # general and dimension pairs: the paper's sequences, unchanged
            assert torch.equal(seqs[n], ref.tokens[n]) and starts[n] == ref.response_start[n]
        for k in range(len(DIMS)):
            m = 2 * (3 + k)  # mirrored pair of dimension k: sequences m (preferred) and m + 1
            if not differ_GD[g, k]:
                assert all(len(seqs[i]) == 2 and starts[i] == 2 for i in (m, m + 1))  # masked: no response token
                continue
            chosen_resp = ref.tokens[0][ref.response_start[0] :]
            rejected_resp = ref.tokens[1][ref.response_start[1] :]
            assert torch.equal(seqs[m][starts[m] :], rejected_resp)  # the rejected response is preferred
            assert torch.equal(seqs[m + 1][starts[m + 1] :], chosen_resp)
            stated = _stated_score(tok, seqs[m], starts[m])
            assert stated == _stated_score(tok, seqs[m + 1], starts[m + 1]) == ds.rejected_scores_GD[g, k]
            assert _stated_score(tok, seqs[2 + 2 * k], starts[2 + 2 * k]) == ds.chosen_scores_GD[g, k]


def test_masked_pairs_carry_no_weight_or_metric(mirrored):
    """The objective sees n = 0 on masked pairs: weight 0, out of the loss and of the pair counts."""
    _, ds, _ = mirrored
    gen = torch.Generator().manual_seed(0)
    n_BP2 = torch.tensor(
        np.stack([(ds.seq_lengths_GN[g] - ds.response_start_GN[g]).reshape(5, 2) for g in range(len(ds))]),
        dtype=torch.float64,
    )
    a_BP2 = -torch.rand(n_BP2.shape, generator=gen, dtype=torch.float64) - 0.5
    p = torch.exp(a_BP2)
    stats = SequenceStats(a_BP2 * n_BP2, n_BP2, p * n_BP2, p * p * n_BP2)
    _, metrics = amopo_loss(stats, AmopoConfig(weighting="gaussian"), sample_ids=torch.arange(len(ds)))
    masked_BP = n_BP2.eq(0).any(-1)
    assert masked_BP[:, :3].sum() == 0 and masked_BP.sum() > 0
    assert (metrics["weights"][masked_BP] == 0).all() and torch.allclose(
        metrics["weights"].sum(-1), torch.ones(len(ds), dtype=metrics["weights"].dtype)
    )
    assert metrics["pair_counts"].tolist() == (~masked_BP).sum(0).double().tolist()
    summary = summarize_metrics(metrics["pair_sums"], metrics["pair_counts"], PAIRS)
    paper_acc = (a_BP2[:, :3, 0] > a_BP2[:, :3, 1]).double().mean().item()
    assert summary["accuracy/all"] == pytest.approx(paper_acc)  # 'all' pools the paper's pairs only
    mirror = ~masked_BP[:, 3:]
    acc = (a_BP2[:, 3:, 0] > a_BP2[:, 3:, 1])[mirror].double().mean().item()
    assert summary["accuracy/mirrored"] == pytest.approx(acc)


def _scored_records(ds, follow: float) -> list[dict]:
    """Per-group records of a constructed model over the dataset's real token sequences.

    Each response token gets a log-prob that depends only on its id (a fixed table), minus
    ``follow`` times the distance between the score the sequence's prompt states and the response's own
    score on that dimension: ``follow = 0`` ignores the dimension prompt, ``follow > 0`` follows it.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOK)
    table = -torch.rand(len(tok), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4 - 0.1
    reports, cfg = [], AmopoConfig(weighting="equal")
    for g in range(len(ds)):
        item = ds[g]
        own = {}  # response tokens -> (own score per dimension)
        for side, scores in ((0, item.chosen_scores), (1, item.rejected_scores)):
            own[tuple(item.tokens[side][item.response_start[side] :].tolist())] = scores.tolist()
        sums, ns = [], []
        for n, (seq, start) in enumerate(zip(item.tokens, item.response_start.tolist())):
            resp = seq[start:]
            logp = table[resp].sum() if len(resp) else torch.tensor(0.0, dtype=torch.float64)
            k = n // 2 - 1 if 2 <= n < 6 else n // 2 - 3
            if n >= 2 and len(resp):
                stated = _stated_score(tok, seq, start)
                logp = logp - follow * len(resp) * abs(stated - own[tuple(resp.tolist())][k])
            sums.append(logp)
            ns.append(float(len(resp)))
        s = torch.stack(sums).view(1, 5, 2)
        n_BP2 = torch.tensor(ns, dtype=torch.float64).view(1, 5, 2)
        stats = SequenceStats(s, n_BP2, torch.zeros_like(s), torch.zeros_like(s))
        loss_B, metrics = amopo_loss(stats, cfg, sample_ids=torch.tensor([g]))
        reports.append(StepReport.of(*reduce_for_schedule(loss_B, metrics), metrics, torch.tensor([g])))
    return report.group_records(reports, ds.row_ids_G, ds.pair_names)


def test_steerability_zero_when_prompt_ignored_positive_when_followed(mirrored):
    _, ds, _ = mirrored
    ignore, follow, strong = _scored_records(ds, 0.0), _scored_records(ds, 0.05), _scored_records(ds, 2.0)
    assert report.mirrored_dimensions(ignore) == DIMS
    for dim in DIMS:
        steer = report.values(ignore, dim, "steerability")
        assert len(steer) == int((ds.chosen_scores_GD != ds.rejected_scores_GD)[:, DIMS.index(dim)].sum())
        assert max(abs(v) for v in steer.values()) < 1e-12  # the mirrored margin is minus the paper one
        assert report.values(ignore, dim, "flip_rate") and not any(report.values(ignore, dim, "flip_rate").values())
        followed = report.values(follow, dim, "steerability")
        assert min(followed.values()) > 0  # stating a response's own score always moves the preference to it
        # a weak pull flips some preferences; one stronger than the responses' own log-prob gap flips all
        assert 0 < np.mean(list(report.values(follow, dim, "flip_rate").values())) < 1
        assert np.mean(list(report.values(strong, dim, "flip_rate").values())) == 1
    summary = report.summarize_groups(follow, resamples=500)
    lo, hi = summary["steerability_ci95/verbosity"]
    assert 0 < lo <= summary["steerability/verbosity"] <= hi
    gain, lo, hi, n = report.paired_gain(ignore, follow, "verbosity", "steerability", resamples=500)
    assert lo > 0 and n == summary["groups_steer/verbosity"]
    table = report.steerability_table(ignore, [("follow", follow)], DIMS, resamples=200)
    assert table.count("| follow |") == 2 and "*" in table
    text = report.format_intervals(summary, ds.pair_names)
    assert "verbosity steerability" in text and "  all: accuracy" in text
    # 'all' is each group's mean over its general and dimension pairs
    g0 = follow[0]
    assert report.values(follow, report.ALL, "margin")[g0["group_id"]] == pytest.approx(
        np.mean([g0[f"margin/{p}"] for p in PAIRS[:3]])
    )


def test_steerability_needs_mirrored_pairs(mirrored):
    _, ds, paper = mirrored
    records = [{"group_id": 0, "row_id": 0, "margin/general": 0.1, "margin/verbosity": 0.2}]
    assert report.mirrored_dimensions(records) == []
    with pytest.raises(ValueError, match="--dimension-pairs mirrored"):
        report.values(records, "verbosity", "steerability")
    assert "steerability/verbosity" not in report.summarize_groups(records, resamples=100)


def test_dimension_that_never_differs_is_refused(tmp_path):
    """Rows whose correctness scores always tie: mirrored pairs for it cannot exist; nothing is written."""
    rows = tmp_path / "rows.jsonl"
    with open(HS2) as src, open(rows, "w") as dst:
        for line in list(src)[:20]:
            r = json.loads(line)
            r["correctness"] = 3
            dst.write(json.dumps(r) + "\n")
    out = tmp_path / "ds"
    with pytest.raises(EmptyOutput, match=r"never differ on \[.correctness.\].*nothing was written"):
        _preprocess(out, "mirrored", dims=["helpfulness", "correctness"], inp=str(rows))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    _preprocess(out, "paper", dims=["helpfulness", "correctness"], inp=str(rows))  # the paper's pairs are fine
    cli = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(rows), "--output", str(out)]
        + ["--tokenizer", TOK, "--dimension-pairs", "sideways", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert (
        cli.returncode != 0
        and "argument --dimension-pairs: invalid choice: 'sideways' (choose from 'paper', 'mirrored')" in cli.stderr
    )


def test_mirrored_name_is_distinct():
    assert mirrored_name("verbosity") == "verbosity~mirrored" not in DataConfig(dimensions=DIMS).pair_names


@pytest.mark.parametrize("layout", ["packed-rows", "packed-thd"])
def test_masked_pairs_through_every_batch_layout(mirrored, layout):
    """Real mirrored groups (token ids folded into a small vocabulary) give the same per-pair margins and
    masks padded, packed in rows and as one THD stream; the masked pairs are invalid in all three."""
    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.training.step import loss_func

    _, ds, _ = mirrored
    vocab = 509
    picked = [g for g in range(len(ds)) if (ds.chosen_scores_GD[g] == ds.rejected_scores_GD[g]).any()][:2]
    picked += [g for g in range(len(ds)) if (ds.chosen_scores_GD[g] != ds.rejected_scores_GD[g]).all()][:1]
    groups = []
    for g in picked:
        item = ds[g]
        groups.append(dataclasses.replace(item, tokens=[t % vocab for t in item.tokens]))
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def margins(batch):
        logits = table[batch.tokens].clone().requires_grad_()  # depends on the token only: layout-free
        _, count, rep = loss_func(batch, AmopoConfig(weighting="gaussian"), logits)
        return count, rep.pair_margins, rep.pair_valid, rep.weights

    ref = margins(build_micro_batch(groups, "padded"))
    thd = layout == "packed-thd"
    got = margins(build_micro_batch(groups, "packed", seq_length=768, thd=thd))
    assert int(ref[0]) == int(got[0]) == 3
    valid = ref[2]
    expect = torch.tensor(
        [
            [True] * 3 + [bool(ds.chosen_scores_GD[g, k] != ds.rejected_scores_GD[g, k]) for k in range(2)]
            for g in picked
        ]
    )
    assert torch.equal(valid, expect) and torch.equal(got[2], expect) and not expect.all()
    torch.testing.assert_close(got[1][valid], ref[1][valid], rtol=1e-10, atol=1e-10)
    assert (got[3][~valid] == 0).all() and (ref[3][~valid] == 0).all()
