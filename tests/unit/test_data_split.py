"""Split by prompt: no prompt in two splits, deterministic by seed, usable by the preprocessing tool."""

from __future__ import annotations

import importlib.util
import json
import os
import random

from megatron_amopo.data.config import DataConfig, SplitConfig
from megatron_amopo.data.split import assign_prompts, split_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HS2 = os.path.join(ROOT, "data", "helpsteer2", "train_rows.jsonl")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _split(tmp_path, name="out", **kw) -> dict:
    cfg = SplitConfig(input=kw.pop("input", HS2), output=str(tmp_path / name), **kw)
    return split_rows(cfg, DataConfig(format="helpsteer2"))


def test_bundled_helpsteer2_no_prompt_crosses_splits(tmp_path):
    summary = _split(tmp_path, split="60,20,20", seed=7)
    files = {name: _rows(tmp_path / "out" / f"{name}.jsonl") for name in ("train", "valid", "heldout")}
    prompts = {name: {r["prompt"] for r in rows} for name, rows in files.items()}
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["train"] & prompts["heldout"]
    assert not prompts["valid"] & prompts["heldout"]
    source = _rows(HS2)
    assert sum(len(rows) for rows in files.values()) == len(source)
    n = len({r["prompt"] for r in source})
    assert [summary["counts"][k]["prompts"] for k in files] == [round(0.6 * n), round(0.2 * n), n - round(0.8 * n)]
    for name, rows in files.items():
        assert summary["counts"][name]["rows"] == len(rows)
        # input order kept: HelpSteer2's two rows of a prompt stay consecutive
        assert rows == [r for r in source if r["prompt"] in prompts[name]]
    assert json.load(open(tmp_path / "out" / "split.json"))["seed"] == 7


def test_deterministic_by_seed_and_independent_of_row_order(tmp_path):
    _split(tmp_path, "a", seed=3)
    _split(tmp_path, "b", seed=3)
    _split(tmp_path, "c", seed=4)
    read = lambda d, s: (tmp_path / d / f"{s}.jsonl").read_text()  # noqa: E731
    assert all(read("a", s) == read("b", s) for s in ("train", "valid", "heldout"))
    assert read("a", "heldout") != read("c", "heldout")
    keys = {f"prompt {i}" for i in range(50)}
    assert assign_prompts(keys, (0.5, 0.25, 0.25), 3) == assign_prompts(
        set(random.sample(sorted(keys), 50)), (0.5, 0.25, 0.25), 3
    )


def test_whitespace_variants_are_one_prompt_and_bad_rows_are_counted(tmp_path):
    rows = [{"prompt": f"question {i}", "response": "r", "helpfulness": 1} for i in range(20)]
    rows.append({"prompt": "question  3\n", "response": "other", "helpfulness": 2})
    rows.append({"response": "no prompt"})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    summary = _split(tmp_path, input=str(path), split="50,0,50", seed=1)
    assert summary["dropped"] == {"malformed_json": 1, "missing_prompt": 1}
    assert summary["counts"]["valid"] == {"prompts": 0, "rows": 0}
    assert not (tmp_path / "out" / "valid.jsonl").exists()
    where = {name: [r["prompt"] for r in _rows(tmp_path / "out" / f"{name}.jsonl")] for name in ("train", "heldout")}
    side = [name for name, ps in where.items() if "question 3" in ps]
    assert len(side) == 1 and "question  3\n" in where[side[0]]


def test_pairs_format_with_chat_prompts(tmp_path):
    rows = [{"q": [{"role": "user", "content": f"q{i % 5}"}], "chosen": "a", "rejected": "b"} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SplitConfig(input=str(path), output=str(tmp_path / "out"), split="60,20,20")
    summary = split_rows(cfg, DataConfig(format="pairs", field_map="prompt=q"))
    assert sum(c["prompts"] for c in summary["counts"].values()) == 5
    seen = [{json.dumps(r["q"]) for r in _rows(p)} for p in (tmp_path / "out").glob("*.jsonl")]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 5


def test_tool_refusals(tmp_path, capsys):
    tool = _tool("split_data")
    for bad in ("80,20", "0,50,50", "a,b,c", "80,-10,30"):
        assert tool.main(["--input", HS2, "--output", str(tmp_path / "x"), "--split", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --split must be three non-negative numbers") and err.count("\n") == 1
    (tmp_path / "taken").mkdir()
    assert tool.main(["--input", HS2, "--output", str(tmp_path / "taken")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert tool.main(["--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "y")]) == 3  # input
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_split_files_preprocess(tmp_path, capsys):
    assert _tool("split_data").main(["--input", HS2, "--output", str(tmp_path / "s"), "--split", "90,0,10"]) == 0
    heldout = len({r["prompt"] for r in _rows(tmp_path / "s" / "heldout.jsonl")})
    assert (
        _tool("preprocess_data").main(
            [
                "--input",
                str(tmp_path / "s" / "heldout.jsonl"),
                "--output",
                str(tmp_path / "d"),
                "--format",
                "helpsteer2",
                "--tokenizer",
                os.path.join(ROOT, "data", "tokenizer-qwen2"),
                "--seq-length",
                "1024",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.load(open(tmp_path / "d" / "metadata.json"))
    # one group per prompt, except the prompts whose two responses tie (dropped by policy)
    assert (
        meta["counts"]["groups_written"] + meta["skipped"].get("tie", 0) + meta["skipped"].get("truncation_limit", 0)
        == heldout
    )
    assert set(meta["skipped"]) <= {"tie", "truncation_limit"}
