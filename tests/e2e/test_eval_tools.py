"""End to end: tools/evaluate.py --per-group-output, tools/compare_evals.py and tools/evaluate_control.py
on a tiny Qwen2 model (real Qwen2 tokenizer) and real HelpSteer2 rows, through the real tools."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_amopo.evaluation.control import spearman
from megatron_amopo.testing.pipeline import (
    PY,
    TINY_SEQ,
    TINY_VOCAB,
    run_tool,
    run_torchrun,
    tiny_qwen2_setup,
    write_shortest_rows,
)

SEQ = TINY_SEQ
PAIRS = ["general", "helpfulness", "verbosity"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltools")
    dims = ["helpfulness", "verbosity"]
    write_shortest_rows(root / "rows.jsonl", 13, dims)  # odd: DP2 evaluation must still cover every group
    tiny_qwen2_setup(root, root / "rows.jsonl", SEQ, dims, vocab=TINY_VOCAB)
    return root


def test_evaluate_per_group_and_compare(setup):
    out, groups = setup / "eval.json", setup / "groups.jsonl"
    run_torchrun(
        "tools/evaluate.py",
        "--load",
        str(setup / "init"),
        "--data-path",
        str(setup / "data"),
        "--micro-batch-size",
        "1",
        "--seq-length",
        str(SEQ),
        "--output",
        str(out),
        "--per-group-output",
        str(groups),
        "--bootstrap-resamples",
        "500",
    )
    values = json.loads(out.read_text())
    records = [json.loads(line) for line in groups.read_text().splitlines()]
    # DP2 splits the groups over two ranks: every group of the dataset comes back exactly once.
    written = json.loads((setup / "data" / "metadata.json").read_text())["counts"]["groups_written"]
    assert written % 2 == 1 and values["groups"] == len(records) == values["samples"] == written
    assert len({r["group_id"] for r in records}) == len(records)
    for pair in PAIRS:
        margins = [r[f"margin/{pair}"] for r in records if r[f"margin/{pair}"] is not None]
        assert math.isclose(np.mean(margins), values[f"margin/{pair}"], rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(np.mean([m > 0 for m in margins]), values[f"accuracy/{pair}"], abs_tol=1e-9)
        lo, hi = values["bootstrap"][f"margin_ci95/{pair}"]
        assert lo <= values["bootstrap"][f"margin/{pair}"] <= hi and lo < hi

    table = run_tool(
        [PY, "tools/compare_evals.py", "--baseline", str(groups), "--arm", f"same={groups}", "--resamples", "500"]
    ).stdout
    rows = [line for line in table.splitlines() if line.startswith("| same |")]
    assert len(rows) == 4 and all(line.count("+0.000 [+0.000, +0.000]") == 2 for line in rows)  # 3 pairs + all
    assert "steerability" not in table  # paper pairs: no mirrored pair to measure it with
    bad = run_tool([PY, "tools/compare_evals.py", "--baseline", str(groups), "--arm", "noequals"], check=False)
    assert bad.returncode != 0 and "--arm must be NAME=FILE" in bad.stderr


def test_evaluate_control_cli(setup):
    out = setup / "control.json"
    proc = run_tool(
        [
            PY,
            "tools/evaluate_control.py",
            "--model",
            str(setup / "hf"),
            "--input",
            str(setup / "rows.jsonl"),
            "--dimension",
            "verbosity",
            "--scores",
            "0",
            "4",
            "--num-prompts",
            "3",
            "--max-new-tokens",
            "5",
            "--batch-size",
            "2",
            "--output",
            str(out),
        ]
    )
    assert "verbosity 4.0: 6/6 replies" in proc.stdout and "Spearman(requested verbosity, length)" in proc.stdout
    result = json.loads(out.read_text())
    replies = result["replies"]
    assert len(replies) == 6 and sorted({r["prompt_index"] for r in replies}) == [0, 1, 2]
    assert all(0 <= r["length"] <= 5 and r["truncated"] == (r["length"] == 5) for r in replies)
    for s in ("0.0", "4.0"):
        lengths = [r["length"] for r in replies if str(r["score"]) == s]
        assert result["per_score"][s]["mean_length"] == np.mean(lengths)
    rho = spearman([r["score"] for r in replies], [r["length"] for r in replies])
    assert (math.isnan(rho) and math.isnan(result["spearman_score_length"])) or rho == result["spearman_score_length"]
    lo, hi = result["spearman_ci95"]
    assert -1 <= lo <= hi <= 1 and "(95% bootstrap over prompts)" in proc.stdout

    for flags, message in [
        (["--dimension", "verbosity", "--scores", "0", "9"], "outside the scale"),
        (["--dimension", "verbosity", "--scores", "2", "2"], "at least two different scores"),
        (["--dimension", "humour"], "no description for dimensions ['humour']"),
    ]:
        proc = run_tool(
            [
                PY,
                "tools/evaluate_control.py",
                "--model",
                str(setup / "hf"),
                "--input",
                str(setup / "rows.jsonl"),
                *flags,
            ],
            check=False,
        )
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_mirrored_pairs_train_evaluate_and_compare(setup):
    """--dimension-pairs mirrored through preprocessing, DP2 training (packed layout), evaluation and the table."""
    data = setup / "data_mirrored"
    run_tool(
        [PY, "tools/preprocess_data.py", "--input", str(setup / "rows.jsonl"), "--output", str(data)]
        + ["--tokenizer", str(setup / "init" / "tokenizer"), "--format", "helpsteer2"]
        + ["--dimensions", "helpfulness", "verbosity", "--dimension-pairs", "mirrored"]
        + ["--seq-length", str(SEQ), "--no-progress"]
    )
    meta = json.loads((data / "metadata.json").read_text())
    pairs = PAIRS + ["helpfulness~mirrored", "verbosity~mirrored"]
    assert meta["pair_names"] == pairs and meta["sequences_per_group"] == 10
    run_torchrun(
        "pretrain_amopo.py",
        *("--load", str(setup / "init"), "--save", str(setup / "mirrored_run"), "--data-path", str(data)),
        *("--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2", "--seq-length", str(SEQ)),
        *("--lr", "1e-3", "--log-interval", "1", "--amopo-weighting", "gaussian"),
    )
    train = [json.loads(line) for line in (setup / "mirrored_run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 2 and all(f"weight/{p}" in train[-1] for p in pairs)
    assert "accuracy/mirrored" in train[-1] and "accuracy/all" in train[-1]
    marker = json.loads(next((setup / "mirrored_run").glob("iter_*/amopo_complete.json")).read_text())
    assert marker["pair_names"] == pairs

    out, groups = setup / "eval_mirrored.json", setup / "groups_mirrored.jsonl"
    run_torchrun(
        "tools/evaluate.py",
        *("--load", str(setup / "mirrored_run"), "--data-path", str(data), "--micro-batch-size", "1"),
        *("--seq-length", str(SEQ), "--output", str(out), "--per-group-output", str(groups)),
        *("--bootstrap-resamples", "500"),
    )
    values = json.loads(out.read_text())
    records = [json.loads(line) for line in groups.read_text().splitlines()]
    assert len(records) == meta["counts"]["groups_written"]
    for dim in ["helpfulness", "verbosity"]:
        both = [r for r in records if r[f"margin/{dim}~mirrored"] is not None]
        assert len(both) == meta["counts"]["mirrored_pairs"][dim] > 0
        steer = np.mean([r[f"margin/{dim}"] + r[f"margin/{dim}~mirrored"] for r in both])
        assert math.isclose(values["bootstrap"][f"steerability/{dim}"], steer, rel_tol=1e-9, abs_tol=1e-12)
        assert values["bootstrap"][f"groups_steer/{dim}"] == len(both)
    table = run_tool(
        [PY, "tools/compare_evals.py", "--baseline", str(groups), "--arm", f"same={groups}", "--resamples", "500"]
    ).stdout
    pair_part, steer_part = table.split("| model | dimension | n | steerability")
    assert sum(line.startswith("| same |") for line in pair_part.splitlines()) == 6  # 5 pairs + all
    steer_rows = [line for line in steer_part.splitlines() if line.startswith("| same |")]
    assert len(steer_rows) == 2 and all(line.count("+0.000 [+0.000, +0.000]") == 2 for line in steer_rows)
