"""Preprocessing to a Megatron-Core IndexedDataset: reader round trip, metadata checks, bad rows,
--strict, atomic output, and the CLI end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.data.preprocess import DataError, preprocess
from megatron_amopo.data.reader import PreferenceGroupDataset
from megatron_amopo.data.records import PreferenceRecord, iter_rows, records
from megatron_amopo.data.tokenization import load_tokenizer, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[2]
HS2 = str(ROOT / "data" / "helpsteer2" / "train_rows.jsonl")
UF = str(ROOT / "data" / "ultrafeedback" / "train_rows_200.jsonl")
BAD = str(ROOT / "tests" / "data" / "bad_rows_amopo.jsonl")
TOK = str(ROOT / "data" / "tokenizer-qwen2")


def _run(tmp_path, name="ds", inp=HS2, limit=100, strict=False, workers=1, **data):
    pre = PreprocessConfig(
        input=inp,
        output=str(tmp_path / name),
        tokenizer=TOK,
        limit=limit,
        strict=strict,
        workers=workers,
        progress=False,
    )
    return preprocess(DataConfig(**data), PromptConfig(), pre), tmp_path / name


@pytest.fixture(scope="module")
def hs2(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("hs2"), seq_length=1024)


def test_round_trip_helpsteer2(hs2):
    meta, path = hs2
    tok = load_tokenizer(TOK)
    ds = PreferenceGroupDataset(
        str(path),
        vocab_hash=tokenizer_fingerprint(tok, TOK)["vocab_hash"],
        dimensions=["helpfulness", "correctness", "coherence"],
        seq_length=1024,
    )
    cfg = DataConfig(format="helpsteer2", seq_length=1024)
    recs = {r.row_id: r for r in records(iter_rows(HS2, limit=100), cfg) if isinstance(r, PreferenceRecord)}
    assert len(ds) == meta["counts"]["groups_written"] > 30
    assert meta["counts"]["rows_read"] == 100 and meta["sequences_per_group"] == 8
    assert sum(meta["skipped"].values()) + len(ds) == 50
    exact = 0
    for g in range(len(ds)):
        item = ds[g]
        rec = recs[item.row_id]
        assert len(item.tokens) == 8 and item.tokens[0].dtype.is_floating_point is False
        assert item.chosen_scores.tolist() == rec.chosen_scores
        assert item.rejected_scores.tolist() == rec.rejected_scores
        for i, (seq, start) in enumerate(zip(item.tokens, item.response_start.tolist())):
            if ds.group_max_len[g] < 1000:  # certainly not truncated: decoded text equals the input text
                assert tok.decode(seq[start:]) == (rec.chosen, rec.rejected)[i % 2] + "<|im_end|>"
                assert tok.decode(seq[:start]).endswith(
                    rec.turns[-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
                )
                exact += 1
    assert exact >= 8 * 30
    lengths = ds.seq_lengths_GN - 1
    assert np.array_equal(ds.group_max_len, lengths.max(1)) and np.array_equal(ds.group_total_len, lengths.sum(1))
    assert ds.group_max_len.max() <= 1024


def test_metadata_mismatch_is_refused(hs2):
    _, path = hs2
    with pytest.raises(ValueError, match="vocab hash"):
        PreferenceGroupDataset(str(path), vocab_hash="0" * 64)
    with pytest.raises(ValueError, match=r"dimensions \['helpfulness', 'correctness', 'coherence'\].*--dimensions"):
        PreferenceGroupDataset(str(path), dimensions=["helpfulness", "coherence", "correctness"])
    with pytest.raises(ValueError, match="--seq-length 512"):
        PreferenceGroupDataset(str(path), seq_length=512)
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        PreferenceGroupDataset(str(path.parent))


def test_bad_rows_report_and_strict(tmp_path):
    meta, path = _run(tmp_path, inp=BAD, limit=None, format="amopo")
    assert meta["counts"]["groups_written"] == 2
    assert meta["skipped"] == {
        "malformed_json": 2,
        "missing_field": 2,
        "bad_score": 1,
        "score_out_of_range": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "tie": 1,
    }
    report = json.loads((path / "skipped.json").read_text())
    assert [e["line"] for e in report["first"]["missing_field"]] == [3, 9]
    assert report["first"]["bad_score"][0]["detail"] == "score 'chosen.helpfulness' must be a finite number, got 'five'"
    with pytest.raises(DataError, match=r"bad_rows_amopo.jsonl line 2: malformed_json"):
        _run(tmp_path, name="strict", inp=BAD, limit=None, strict=True, format="amopo")
    assert not (tmp_path / "strict").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_too_long_and_atomic_overwrite(tmp_path):
    _run(tmp_path, inp=UF, limit=6, format="pairs", seq_length=2048)
    before = (tmp_path / "ds" / "data.bin").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(tmp_path, inp=UF, limit=20, format="pairs")
    with pytest.raises(DataError, match=r"line 1: too_long: .*--seq-length 32"):
        pre = PreprocessConfig(
            input=UF, output=str(tmp_path / "ds"), tokenizer=TOK, limit=6, strict=True, overwrite=True, progress=False
        )
        preprocess(DataConfig(format="pairs", seq_length=32), PromptConfig(), pre)
    assert (tmp_path / "ds" / "data.bin").read_bytes() == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_workers_give_identical_output(tmp_path):
    _run(tmp_path, name="w1", limit=24, seq_length=512)
    _run(tmp_path, name="w2", limit=24, seq_length=512, workers=2)
    for f in ("data.bin", "data.idx", "response_start.npy", "chosen_scores.npy", "row_ids.npy"):
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes()


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "uf"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "preprocess_data.py"),
        "--input",
        UF,
        "--format",
        "pairs",
        "--tokenizer",
        TOK,
        "--output",
        str(out),
        "--limit",
        "12",
        "--seq-length",
        "1024",
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    line = res.stdout.strip().splitlines()[-1]
    meta = json.loads((out / "metadata.json").read_text())
    n_ties = sum(
        json.loads(line)["metadata"]["score_chosen"] == json.loads(line)["metadata"]["score_rejected"]
        for line in open(UF).readlines()[:12]
    )
    assert line.startswith(f"rows read 12 | groups written {12 - n_ties - meta['skipped'].get('truncation_limit', 0)}")
    assert f"tie={n_ties}" in line and meta["dimensions"] == ["overall"] and meta["num_pairs"] == 2
    bad = subprocess.run(cmd[:-1] + ["--seq-length", "4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seq-length must be >= 8" in bad.stderr


def _preprocess_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "case, code, message",
    [
        (
            "other_format",
            4,
            "no groups written from 200 rows; skipped missing_field=200 (line 1: field 'response' "
            "is missing); nothing was written — the rows have fields prompt, chosen, rejected, source_index, metadata, "
            "which match --format pairs, not --format helpsteer2",
        ),
        ("empty", 4, "holds no rows; nothing was written — check the file"),
        ("too_long", 4, "no groups written from 8 rows; skipped too_long=4 (line 1: "),
        ("skipped_fraction", 4, "2 of 3 groups skipped (67% > --max-skipped-fraction 0.5)"),
        ("missing_input", 3, "--input {tmp}/none.jsonl does not exist — check the path"),
    ],
)
def test_cli_nothing_usable_fails_with_one_line(tmp_path, capsys, case, code, message):
    """Nothing usable is no success: a distinct exit code, one line naming the reasons and the fix, no output."""
    lines = open(HS2).readlines()
    inp, extra = tmp_path / "rows.jsonl", []
    if case == "other_format":
        inp = Path(UF)
    elif case == "empty":
        inp.write_text("")
    elif case == "too_long":
        inp.write_text("".join(lines[:8]))
        extra = ["--seq-length", "64"]
    elif case == "skipped_fraction":
        inp.write_text("".join(lines[:2]) + '{"prompt": "x"}\n{"prompt": "y"}\n')
        extra = ["--max-skipped-fraction", "0.5"]
    else:
        inp = tmp_path / "none.jsonl"
    argv = ["--input", str(inp), "--output", str(tmp_path / "ds"), "--tokenizer", TOK, "--no-progress", *extra]
    assert _preprocess_tool().main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(tmp=tmp_path) in err[0], err
    if case == "too_long":
        assert "the shortest dropped group has" in err[0] and "tokens per sequence uncut, --seq-length 64" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({inp.name} & {"rows.jsonl"})  # nothing left
