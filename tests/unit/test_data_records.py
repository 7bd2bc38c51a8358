"""Input formats -> preference records, on the bundled real HelpSteer2 and UltraFeedback rows."""

import json
from collections import Counter
from pathlib import Path

import pytest

from megatron_amopo.data.config import DataConfig
from megatron_amopo.data.records import PreferenceRecord, Skip, iter_rows, parse_turns, records

ROOT = Path(__file__).resolve().parents[2]
HS2 = ROOT / "data" / "helpsteer2" / "train_rows.jsonl"
UF = ROOT / "data" / "ultrafeedback" / "train_rows_200.jsonl"
BAD = ROOT / "tests" / "data" / "bad_rows_amopo.jsonl"


def _rows(path, n=None):
    return [json.loads(line) for line in open(path)][:n]


def test_helpsteer2_pairs_and_rule():
    cfg = DataConfig(format="helpsteer2")
    out = list(records(iter_rows(str(HS2), limit=200), cfg))
    raw = _rows(HS2, 200)
    recs = [r for r in out if isinstance(r, PreferenceRecord)]
    ties = [s for s in out if isinstance(s, Skip)]
    assert len(recs) + len(ties) == 100 and all(s.reason == "tie" for s in ties)
    for rec in recs:
        a, b = raw[rec.row_id], raw[rec.row_id + 1]
        assert a["prompt"] == b["prompt"]
        mean = lambda r: sum(r[d] for d in cfg.dimensions) / 3  # noqa: E731
        best, worst = (a, b) if mean(a) > mean(b) else (b, a)
        assert rec.chosen == best["response"] and rec.rejected == worst["response"]
        assert rec.chosen_scores == [float(best[d]) for d in cfg.dimensions]
        assert rec.rejected_scores == [float(worst[d]) for d in cfg.dimensions]
    for tie in ties:
        a, b = raw[tie.line - 1], raw[tie.line]
        assert sum(a[d] for d in cfg.dimensions) == sum(b[d] for d in cfg.dimensions)


def test_helpsteer2_single_dimension_rule():
    cfg = DataConfig(format="helpsteer2", pair_rule="verbosity")
    raw = _rows(HS2, 100)
    for rec in records(iter_rows(str(HS2), limit=100), cfg):
        if isinstance(rec, PreferenceRecord):
            by = {r["response"]: r["verbosity"] for r in raw[rec.row_id : rec.row_id + 2]}
            assert by[rec.chosen] > by[rec.rejected]


def test_helpsteer2_multi_turn_parsing_on_real_rows():
    raw = [r for r in _rows(HS2) if "<extra_id_1>" in r["prompt"]]
    assert len(raw) == 104
    for r in raw:
        turns = parse_turns(r["prompt"])
        roles = [t["role"] for t in turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert not any("<extra_id_1>" in t["content"] for t in turns)
        assert r["prompt"].rstrip().endswith(turns[-1]["content"].rstrip())
    assert parse_turns(raw[0]["prompt"])[-1]["content"] == "Please provide more examples but vary to another domain"


def test_pairs_ultrafeedback_single_dimension_and_ties():
    cfg = DataConfig(format="pairs", score_min=1, score_max=10)
    raw = _rows(UF)
    out = list(records(iter_rows(str(UF)), cfg))
    assert len(out) == 200
    n_ties = sum(r["metadata"]["score_chosen"] == r["metadata"]["score_rejected"] for r in raw)
    assert Counter(s.reason for s in out if isinstance(s, Skip)) == Counter({"tie": n_ties})
    rec = next(r for r in out if isinstance(r, PreferenceRecord))
    assert rec.turns == [{"role": "user", "content": raw[rec.row_id]["prompt"]}]
    assert rec.chosen == raw[rec.row_id]["chosen"]
    assert rec.chosen_scores == [raw[rec.row_id]["metadata"]["score_chosen"]]


def test_pairs_field_map_and_messages(tmp_path):
    raw = _rows(UF, 5)
    path = tmp_path / "renamed.jsonl"
    with open(path, "w") as fh:
        for r in raw:
            fh.write(
                json.dumps(
                    {
                        "q": [{"role": "user", "content": r["prompt"]}],
                        "good": [{"role": "assistant", "content": r["chosen"]}],
                        "bad": r["rejected"],
                        "s": {"c": r["metadata"]["score_chosen"], "r": r["metadata"]["score_rejected"]},
                    }
                )
                + "\n"
            )
    cfg = DataConfig(format="pairs", field_map="prompt=q,chosen=good,rejected=bad,score_chosen=s.c,score_rejected=s.r")
    ref = [r for r in records(iter_rows(str(UF), limit=5), DataConfig(format="pairs"))]
    got = list(records(iter_rows(str(path)), cfg))
    assert [getattr(r, "chosen", r) for r in got] == [getattr(r, "chosen", r) for r in ref]
    with pytest.raises(ValueError, match="--field-map entry 'answer=x'"):
        DataConfig(format="pairs", field_map="answer=x")


def test_json_and_parquet_inputs_match_jsonl(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = _rows(HS2, 40)
    (tmp_path / "rows.json").write_text(json.dumps(raw))
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "rows.parquet")
    cfg = DataConfig(format="helpsteer2")
    ref = [
        (r.chosen, r.rejected, r.chosen_scores)
        for r in records(iter_rows(str(HS2), limit=40), cfg)
        if isinstance(r, PreferenceRecord)
    ]
    for name in ("rows.json", "rows.parquet"):
        got = [
            (r.chosen, r.rejected, r.chosen_scores)
            for r in records(iter_rows(str(tmp_path / name)), cfg)
            if isinstance(r, PreferenceRecord)
        ]
        assert got == ref and len(ref) > 10


def test_amopo_bad_rows_every_reason():
    cfg = DataConfig(format="amopo")
    out = list(records(iter_rows(str(BAD)), cfg))
    skips = {s.line: s.reason for s in out if isinstance(s, Skip)}
    assert skips == {
        2: "malformed_json",
        3: "missing_field",
        4: "bad_score",
        5: "score_out_of_range",
        6: "empty_response",
        7: "identical_responses",
        8: "tie",
        9: "missing_field",
        10: "malformed_json",
    }
    good = [r for r in out if isinstance(r, PreferenceRecord)]
    assert [r.line for r in good] == [1, 11]
    assert good[0].chosen_scores == [5.0, 5.0, 5.0] and good[0].rejected_scores == [2.0, 1.0, 3.0]


def test_helpsteer2_unpaired_and_bad_score(tmp_path):
    raw = _rows(HS2, 6)
    raw[2]["correctness"] = 7  # out of the 0-4 range; its partner (row 4) is left unpaired
    path = tmp_path / "hs2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    out = list(records(iter_rows(str(path)), DataConfig(format="helpsteer2")))
    skips = [(s.line, s.reason) for s in out if isinstance(s, Skip)]
    assert (3, "score_out_of_range") in skips and (4, "unpaired") in skips


def test_config_errors_are_actionable():
    with pytest.raises(ValueError, match="not HelpSteer2 attributes"):
        DataConfig(format="helpsteer2", dimensions=["honesty"])
    with pytest.raises(ValueError, match="--score-min"):
        DataConfig(score_min=4, score_max=0)
    with pytest.raises(ValueError, match="--pair-rule"):
        DataConfig(pair_rule="median")
    assert DataConfig(dimensions=["helpfulness,coherence"]).dimensions == ["helpfulness", "coherence"]
