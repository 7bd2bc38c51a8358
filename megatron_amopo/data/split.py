"""Split preference rows by prompt: every row of one prompt lands in the same split.

Distinct prompts (whitespace-normalised) are sorted, permuted with a seeded generator
and cut by the split fractions, so the result depends only on the seed and the set of
prompts, not on row order. Rows keep their input order inside a split (HelpSteer2's
consecutive pairs stay consecutive). Output: one JSONL file per non-empty split and
``split.json`` (seed, fractions, counts), written to a temporary directory and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from megatron_amopo.data.config import SPLIT_NAMES, DataConfig, SplitConfig
from megatron_amopo.data.preprocess import replace_dir
from megatron_amopo.data.records import BadRow, Skip, field_at, iter_rows


def prompt_key(row: dict, data_cfg: DataConfig) -> str:
    """The prompt a row answers, whitespace-normalised; chat-message lists compare as canonical JSON."""
    value = field_at(row, data_cfg.field_paths["prompt"] if data_cfg.format == "pairs" else "prompt")
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return " ".join(text.split())


def assign_prompts(keys: set[str], fractions: tuple[float, ...], seed: int) -> dict[str, int]:
    """Prompt -> split index; split k gets round(cumulative fraction * n) - previous cut prompts."""
    ordered = sorted(keys)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    cuts = np.round(np.cumsum(fractions) * len(ordered)).astype(int)
    return {ordered[i]: int(np.searchsorted(cuts, rank, side="right")) for rank, i in enumerate(perm)}


def split_rows(cfg: SplitConfig, data_cfg: DataConfig) -> dict:
    """Write the split row files of ``cfg.input`` to ``cfg.output``; returns the ``split.json`` contents."""
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    rows, dropped = [], {"malformed_json": 0, "missing_prompt": 0}
    for _, _, row in iter_rows(cfg.input):
        if isinstance(row, Skip):
            dropped["malformed_json"] += 1
            continue
        try:
            rows.append((prompt_key(row, data_cfg), row))
        except BadRow:
            dropped["missing_prompt"] += 1
    if not rows:
        raise ValueError(f"{cfg.input}: no row with a prompt to split")
    fractions = cfg.fractions()
    where = assign_prompts({k for k, _ in rows}, fractions, cfg.seed)
    counts = {name: {"prompts": 0, "rows": 0} for name in SPLIT_NAMES}
    for k in where.values():
        counts[SPLIT_NAMES[k]]["prompts"] += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {
            name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name, f in zip(SPLIT_NAMES, fractions) if f > 0
        }
        for key, row in rows:
            name = SPLIT_NAMES[where[key]]
            files[name].write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[name]["rows"] += 1
        for fh in files.values():
            fh.close()
        summary = {
            "input": os.path.basename(cfg.input),
            "format": data_cfg.format,
            "seed": cfg.seed,
            "fractions": dict(zip(SPLIT_NAMES, fractions)),
            "counts": counts,
            "dropped": dropped,
        }
        (tmp / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
