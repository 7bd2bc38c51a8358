"""The published AMoPO training-file layout through tools/preprocess_data.py, end to end.

tests/data/published_amopo.json is written by us in the layout of github.com/Javkonline/AMoPO's
HelpSteer2 file (LLaMA-Factory ``formatting: amopo``): a JSON array of rows with ``prompt`` (text) and
``chosen`` / ``rejected`` objects holding the text under ``response`` and the scores ``helpfulness``,
``correctness``, ``instruction_following`` (here as numeric strings). Row 2 ties under the mean rule
and row 4's "rejected" is the better response under it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_amopo.data.config import DataConfig
from megatron_amopo.data.reader import PreferenceGroupDataset
from megatron_amopo.data.records import PreferenceRecord, Skip, iter_rows, records
from megatron_amopo.data.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "tests" / "data" / "published_amopo.json"
TOK = str(ROOT / "data" / "tokenizer-qwen2")
ROWS = json.loads(PUBLISHED.read_text())


def _preprocess(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(PUBLISHED), "--format", "amopo"]
    cmd += ["--tokenizer", TOK, "--output", str(out), "--seq-length", "512", "--no-progress", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads((out / "metadata.json").read_text())


def _groups(out: Path) -> list[dict]:
    ds = PreferenceGroupDataset(str(out), dimensions=["helpfulness", "correctness", "instruction_following"])
    return [ds[g] for g in range(len(ds))]


def _scores(side: dict) -> list[float]:
    return [float(side[d]) for d in ("helpfulness", "correctness", "instruction_following")]


def test_as_given_keeps_every_row_in_its_order(tmp_path):
    meta = _preprocess(tmp_path / "given", "--pair-rule", "as-given")
    assert meta["counts"]["groups_written"] == len(ROWS) and not meta["skipped"]
    tok = load_tokenizer(TOK)
    for item in _groups(tmp_path / "given"):
        row = ROWS[item.row_id]
        assert item.chosen_scores.tolist() == _scores(row["chosen"])
        assert item.rejected_scores.tolist() == _scores(row["rejected"])
        assert len(item.tokens) == 8  # 4 pairs, chosen and rejected each
        for i, (seq, start) in enumerate(zip(item.tokens, item.response_start.tolist())):
            text = row["chosen" if i % 2 == 0 else "rejected"]["response"]
            assert tok.decode(seq[start:]) == text + "<|im_end|>"
            assert row["prompt"] in tok.decode(seq[:start])


def test_mean_rule_drops_the_tie_and_orders_by_score(tmp_path):
    meta = _preprocess(tmp_path / "mean")
    assert meta["counts"]["groups_written"] == len(ROWS) - 1 and meta["skipped"] == {"tie": 1}
    by_row = {item.row_id: item for item in _groups(tmp_path / "mean")}
    assert 1 not in by_row  # the tie
    assert by_row[3].chosen_scores.tolist() == _scores(ROWS[3]["rejected"])  # swapped: the rule decides


def test_field_names_and_score_strings():
    cfg = DataConfig(format="amopo", pair_rule="as-given")
    recs = list(records(iter_rows(str(PUBLISHED)), cfg))
    assert all(isinstance(r, PreferenceRecord) for r in recs)
    assert recs[0].chosen == ROWS[0]["chosen"]["response"] and recs[0].chosen_scores == [4.0, 4.0, 4.0]
    bad = [(0, 1, {"prompt": "Hi", "chosen": {"text": "a", "helpfulness": 1}, "rejected": {"text": "b"}})]
    (skip,) = records(bad, cfg)
    assert isinstance(skip, Skip) and skip.reason == "missing_field" and "'content' or 'response'" in skip.detail
    worded = [(0, 1, {"prompt": "Hi", "chosen": {"response": "a", **dict.fromkeys(cfg.dimensions, "four")},
                      "rejected": {"response": "b", **dict.fromkeys(cfg.dimensions, "1")}})]  # fmt: skip
    (skip,) = records(worded, cfg)
    assert skip.reason == "bad_score" and "'four'" in skip.detail


def test_as_given_is_refused_for_helpsteer2():
    with pytest.raises(ValueError, match="as-given keeps a file's chosen/rejected"):
        DataConfig(format="helpsteer2", pair_rule="as-given")
