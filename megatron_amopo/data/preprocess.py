"""Preference rows -> Megatron-Core IndexedDataset of groups, written atomically.

Output directory (``FORMAT_VERSION`` 1):
  data.bin / data.idx     megatron.core IndexedDataset; one document per group, 2P items
                          (sequence index 2*k + side, see tokenization.py; P from ``pair_names``)
  response_start.npy      [N] int32, first response token of each sequence (N = G * 2P)
  chosen_scores.npy       [G, D] float32, per-dimension scores of the chosen response
  rejected_scores.npy     [G, D] float32
  row_ids.npy             [G] int64, 0-based index of the group's first input row
  metadata.json           format version, tokenizer fingerprint, dimensions, templates, counts
  skipped.json            per-reason counts, first line numbers and details of skipped rows

Everything is written into a hidden temporary directory next to the output and renamed at the
end, so a failure leaves no dataset behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.data.prompts import PromptBuilder, load_templates
from megatron_amopo.data.records import ERROR_REASONS, PreferenceRecord, Skip, iter_rows, records
from megatron_amopo.data.tokenization import EncodedGroup, GroupEncoder, load_tokenizer, tokenizer_fingerprint
from megatron_amopo.runtime.errors import EmptyOutput, InputError

FORMAT_VERSION = 1
DATA_PREFIX = "data"
REPORT_FIRST = 5  # line numbers kept per skip reason in skipped.json


class DataError(InputError, ValueError):
    """A bad input row under --strict; the message names the file, the line and the reason."""


def _make_encoder(tokenizer: str, data_cfg: DataConfig, prompt_cfg: PromptConfig) -> GroupEncoder:
    tok = load_tokenizer(tokenizer)
    templates = load_templates(prompt_cfg.template_file)
    builder = PromptBuilder(templates, data_cfg.dimensions, data_cfg.score_min, data_cfg.score_max)
    return GroupEncoder(tok, data_cfg, prompt_cfg, builder)


_WORKER: Optional[GroupEncoder] = None


def _worker_init(tokenizer: str, data_cfg: DataConfig, prompt_cfg: PromptConfig) -> None:
    global _WORKER  # one encoder (tokenizer) per worker process, as multiprocessing intends
    _WORKER = _make_encoder(tokenizer, data_cfg, prompt_cfg)


def _encode_chunk(items: list) -> list:
    assert _WORKER is not None, "runs in a pool worker started by _worker_init"
    return [_WORKER.encode(it) if isinstance(it, PreferenceRecord) else it for it in items]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class _Tally:
    """Rows read, skip counts by reason with first line numbers, --strict enforcement."""

    def __init__(self, path: str, strict: bool) -> None:
        self.path, self.strict = path, strict
        self.where = "line" if path.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson")) else "row"
        self.rows = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, list] = defaultdict(list)
        self.first_row: Optional[dict] = None  # for the empty-output message: the fields the rows have
        self.least_tokens = 0  # the shortest group dropped for length, uncut

    def count_rows(self, rows):
        for item in rows:
            self.rows += 1
            if self.first_row is None and isinstance(item[2], dict):
                self.first_row = item[2]
            yield item

    def skip(self, s: Skip) -> None:
        if self.strict and s.reason in ERROR_REASONS:
            raise DataError(f"{self.path} {self.where} {s.line}: {s.reason}: {s.detail} (--strict)")
        self.skipped[s.reason] += 1
        if s.tokens:
            self.least_tokens = min(self.least_tokens or s.tokens, s.tokens)
        if len(self.examples[s.reason]) < REPORT_FIRST:
            self.examples[s.reason].append({self.where: s.line, "detail": s.detail})

    def report(self) -> dict:
        return {"counts": dict(self.skipped), "first": dict(self.examples), "numbering": self.where}


class _Writer:
    """Megatron-Core IndexedDatasetBuilder plus the sidecar arrays."""

    def __init__(self, tmp: Path, vocab_size: int) -> None:
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = str(tmp / DATA_PREFIX)
        self.dtype = DType.optimal_dtype(vocab_size)
        self.builder = IndexedDatasetBuilder(self.prefix + ".bin", dtype=self.dtype)
        self.response_start: list[np.ndarray] = []  # [2P] per group
        self.chosen: list[list[float]] = []  # [D] per group
        self.rejected: list[list[float]] = []
        self.row_ids: list[int] = []
        self.tokens = self.truncated = self.user_lost = 0
        self.cut = [0, 0, 0]  # groups with 0, 1 or 2 responses cut
        self.mirrored: Counter = Counter()  # dimension index -> groups with its mirrored pair

    def add(self, g: EncodedGroup) -> None:
        import torch

        for seq in g.sequences:
            self.builder.add_item(torch.from_numpy(seq))
            self.tokens += len(seq)
        self.builder.end_document()  # one document per group (Megatron document = our group)
        self.response_start.append(g.response_start)
        self.chosen.append(g.chosen_scores)
        self.rejected.append(g.rejected_scores)
        self.row_ids.append(g.row_id)
        self.truncated += g.user_tokens_lost > 0
        self.user_lost += g.user_tokens_lost
        self.cut[g.responses_cut] += 1
        self.mirrored.update(k for k, m in enumerate(g.mirrored or []) if m)

    def finalize(self, tmp: Path, dims: int) -> None:
        self.builder.finalize(self.prefix + ".idx")
        as_2d = lambda x: np.asarray(x, dtype=np.float32).reshape(-1, dims)  # noqa: E731
        rs = np.concatenate(self.response_start) if self.response_start else np.zeros(0, np.int32)
        np.save(tmp / "response_start.npy", rs.astype(np.int32))
        np.save(tmp / "chosen_scores.npy", as_2d(self.chosen))
        np.save(tmp / "rejected_scores.npy", as_2d(self.rejected))
        np.save(tmp / "row_ids.npy", np.asarray(self.row_ids, dtype=np.int64))


def _results(items: Iterator, pre: PreprocessConfig, data_cfg, prompt_cfg) -> Iterator:
    """Encoded groups and skips in input order, in this process or a worker pool."""
    if pre.workers == 1:
        enc = _make_encoder(pre.tokenizer, data_cfg, prompt_cfg)
        for it in items:
            yield enc.encode(it) if isinstance(it, PreferenceRecord) else it
        return
    # fork shares the already imported modules; each worker loads its own tokenizer.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(pre.workers, _worker_init, (pre.tokenizer, data_cfg, prompt_cfg)) as pool:
        for chunk in pool.imap(_encode_chunk, _chunks(items, pre.chunk_size)):
            yield from chunk


def _metadata(fp, data_cfg, prompt_cfg, builder: PromptBuilder, tally: _Tally, w: _Writer, seconds, pre) -> dict:
    groups = len(w.row_ids)
    return {
        "format_version": FORMAT_VERSION,
        "input": {"file": os.path.basename(pre.input), "format": data_cfg.format, "limit": pre.limit},
        "tokenizer": fp,
        "token_dtype": np.dtype(w.dtype).name,
        "dimensions": list(data_cfg.dimensions),
        "dimension_pairs": data_cfg.dimension_pairs,
        "pair_names": data_cfg.pair_names,
        "num_pairs": data_cfg.num_pairs,
        "sequences_per_group": 2 * data_cfg.num_pairs,
        "score_range": [data_cfg.score_min, data_cfg.score_max],
        "pair_rule": data_cfg.pair_rule,
        "prompt": {
            "placement": prompt_cfg.placement,
            "template_hash": builder.template_hash(prompt_cfg.placement),
            "templates": builder.templates,
        },
        "seq_length": data_cfg.seq_length,
        "max_tokens_per_sequence": data_cfg.seq_length + 1,
        "truncation": {
            "response_share": data_cfg.response_share,
            "max_user_loss": data_cfg.max_user_loss,
            "cut_ends": data_cfg.cut_ends,
        },
        "counts": {
            "rows_read": tally.rows,
            "groups_written": groups,
            "sequences": groups * 2 * data_cfg.num_pairs,
            "tokens": w.tokens,
            "groups_truncated": w.truncated,
            "user_tokens_lost": w.user_lost,
            "groups_by_responses_cut": {"none": w.cut[0], "one": w.cut[1], "both": w.cut[2]},
            **(
                {"mirrored_pairs": {d: w.mirrored[k] for k, d in enumerate(data_cfg.dimensions)}}
                if data_cfg.dimension_pairs == "mirrored"
                else {}
            ),
        },
        "skipped": dict(tally.skipped),
        "seconds": round(seconds, 3),
    }


def preprocess(data_cfg: DataConfig, prompt_cfg: PromptConfig, pre: PreprocessConfig, progress=None) -> dict:
    """Write the dataset directory ``pre.output``; returns its metadata."""
    start = time.perf_counter()
    out = Path(pre.output)
    if out.exists() and not pre.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not os.path.isfile(pre.input):
        raise InputError(f"--input {pre.input} does not exist", "check the path (a .jsonl, .json or .parquet file)")
    if not os.path.isdir(pre.tokenizer):
        raise InputError(f"--tokenizer {pre.tokenizer} is not a directory", "give a local Hugging Face tokenizer")
    tok = load_tokenizer(pre.tokenizer)
    fp = tokenizer_fingerprint(tok, pre.tokenizer)
    builder = PromptBuilder(
        load_templates(prompt_cfg.template_file), data_cfg.dimensions, data_cfg.score_min, data_cfg.score_max
    )
    del tok
    tally = _Tally(pre.input, pre.strict)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        w = _Writer(tmp, fp["vocab_size"])
        items = records(tally.count_rows(iter_rows(pre.input, pre.limit)), data_cfg)
        for res in _results(items, pre, data_cfg, prompt_cfg):
            if isinstance(res, Skip):
                tally.skip(res)
            else:
                w.add(res)
            if progress is not None:
                progress.update(tally.rows - progress.n)  # the bar counts input rows
        check_usable(tally, len(w.row_ids), data_cfg, pre)
        _check_mirrored(w, data_cfg, pre.input)
        w.finalize(tmp, len(data_cfg.dimensions))
        meta = _metadata(fp, data_cfg, prompt_cfg, builder, tally, w, time.perf_counter() - start, pre)
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        (tmp / "skipped.json").write_text(json.dumps(tally.report(), indent=2, ensure_ascii=False))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _guess_format(row: dict) -> Optional[str]:
    """The input format a row looks like (the fields records.py reads), or None."""
    if {"prompt", "response", "helpfulness"} <= set(row):
        return "helpsteer2"
    if isinstance(row.get("chosen"), dict) and "content" in row["chosen"]:
        return "amopo"
    if {"chosen", "rejected"} <= set(row):
        return "pairs"
    return None


def check_usable(tally: _Tally, groups: int, data_cfg: DataConfig, pre: PreprocessConfig) -> None:
    """Refuse an output with no groups, or more skipped rows than --max-skipped-fraction allows."""
    skipped = sum(tally.skipped.values())
    fraction = skipped / max(1, skipped + groups)
    if groups and fraction <= pre.max_skipped_fraction:
        return
    if tally.rows == 0:
        raise EmptyOutput(
            f"{pre.input} holds no rows; nothing was written", "check the file (JSON lines, one object each)"
        )
    top = tally.skipped.most_common(3)
    reasons = ", ".join(
        f"{r}={n} ({tally.where} {tally.examples[r][0][tally.where]}: {tally.examples[r][0]['detail']})" for r, n in top
    )
    what = (
        f"{pre.input}: no groups written from {tally.rows} rows"
        if not groups
        else f"{pre.input}: {skipped} of {skipped + groups} groups skipped ({fraction:.0%} > --max-skipped-fraction "
        f"{pre.max_skipped_fraction})"
    )
    raise EmptyOutput(f"{what}; skipped {reasons}; nothing was written", _likely_fix(tally, data_cfg, top[0][0]))


def _likely_fix(tally: _Tally, data_cfg: DataConfig, reason: str) -> str:
    if reason in ("missing_field", "bad_score", "unpaired"):
        row = tally.first_row or {}
        fields, guess = list(row), _guess_format(row)
        shown = ", ".join(fields[:8]) + (", ..." if len(fields) > 8 else "")
        if guess and guess != data_cfg.format:
            return f"the rows have fields {shown}, which match --format {guess}, not --format {data_cfg.format}"
        return f"the rows have fields {shown}; choose the --format (and --field-map or --dimensions) they match"
    if reason in ("too_long", "truncation_limit", "cut_response") and tally.least_tokens:
        return (
            f"the shortest dropped group has {tally.least_tokens} tokens per sequence uncut, --seq-length "
            f"{data_cfg.seq_length} allows {data_cfg.seq_length + 1}: raise --seq-length ({tally.least_tokens - 1} "
            "keeps it whole) or --max-user-loss"
        )
    if reason == "malformed_json":
        return "the input must be JSON lines: one JSON object per line"
    if reason == "tie":
        return "every pair ties under --pair-rule; choose another --pair-rule or --dimensions"
    return "see the reasons above; --strict stops at the first bad row with its line number"


def _check_mirrored(w: _Writer, data_cfg: DataConfig, path: str) -> None:
    """With mirrored pairs, every dimension must differ between the responses of at least one group."""
    if data_cfg.dimension_pairs != "mirrored" or not w.row_ids:
        return
    never = [d for k, d in enumerate(data_cfg.dimensions) if w.mirrored[k] == 0]
    if never:
        raise EmptyOutput(
            f"{path}: --dimension-pairs mirrored: the two responses' scores never differ on {never} in the "
            f"{len(w.row_ids)} groups written, so these dimensions get no mirrored pair; nothing was written",
            "drop them from --dimensions or use --dimension-pairs paper",
        )


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (--overwrite) is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summary_line(meta: dict) -> str:
    c = meta["counts"]
    skipped = " ".join(f"{k}={v}" for k, v in sorted(meta["skipped"].items())) or "none"
    return (
        f"rows read {c['rows_read']} | groups written {c['groups_written']} | skipped {skipped} | "
        f"tokens {c['tokens']} | {meta['seconds']:.1f} s"
    )
