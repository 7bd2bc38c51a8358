"""Input rows -> preference records (chat turns, chosen/rejected responses, per-dimension scores).

Three formats (``DataConfig.format``):
  amopo       {"prompt": str, "chosen": {"content": str, <dim>: score, ...}, "rejected": {...}}; the
              published AMoPO files name the text "response" and may hold scores as numeric strings
  helpsteer2  HelpSteer2 rows (prompt, response, helpfulness, ..., verbosity), two rows per prompt,
              consecutive; multi-turn prompts use "<extra_id_1>User" / "<extra_id_1>Assistant" markers.
  pairs       generic chosen/rejected rows; ``DataConfig.field_paths`` names the fields; one score each.

Bad rows are yielded as ``Skip`` items (reason, line, detail) so the caller can count them or,
with ``--strict``, stop. JSONL is read line by line here because Hugging Face ``datasets`` does
not report the line of a malformed JSON line; JSON and Parquet go through ``datasets`` streaming.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from megatron_amopo.data.config import HELPSTEER2_ATTRS, DataConfig

# Reasons that are data errors (``--strict`` stops on them) vs policy drops (always just counted).
ERROR_REASONS = (
    "malformed_json",
    "missing_field",
    "bad_score",
    "score_out_of_range",
    "empty_response",
    "identical_responses",
    "bad_prompt",
    "unpaired",
    "too_long",
)
POLICY_REASONS = ("tie", "truncation_limit")


@dataclass
class Skip:
    """A row (or group of rows) that produced no group."""

    reason: str
    line: int  # 1-based line of a JSONL file, else 1-based row number
    detail: str = ""
    tokens: int = 0  # a group dropped for length: its longest sequence uncut (tokens), else 0


@dataclass
class PreferenceRecord:
    """One preference comparison; ``turns`` ends with the final user turn."""

    turns: list[dict]
    chosen: str
    rejected: str
    chosen_scores: list[float]  # [D], in DataConfig.dimensions order
    rejected_scores: list[float]  # [D]
    row_id: int  # 0-based index of the first source row
    line: int  # 1-based line / row number of the first source row


class BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------
# Raw rows


def iter_rows(path: str, limit: Optional[int] = None) -> Iterator[tuple[int, int, Union[dict, Skip]]]:
    """Yield (row_index, line, row or Skip) from a .jsonl, .json or .parquet file."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.gz")) or lower.endswith(".ndjson"):
        rows = _iter_jsonl(path)
    elif lower.endswith(".json"):
        rows = _iter_datasets("json", path)
    elif lower.endswith(".parquet"):
        rows = _iter_datasets("parquet", path)
    else:
        raise ValueError(f"{path}: unknown input type; use a .jsonl, .json or .parquet file")
    for index, (line, row) in enumerate(rows):
        if limit is not None and index >= limit:
            return
        yield index, line, row


def _iter_jsonl(path: str) -> Iterator[tuple[int, Union[dict, Skip]]]:
    opener = __import__("gzip").open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                yield lineno, Skip("malformed_json", lineno, str(err))
                continue
            if not isinstance(row, dict):
                yield lineno, Skip("malformed_json", lineno, f"a row must be a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row


def _iter_datasets(kind: str, path: str) -> Iterator[tuple[int, dict]]:
    # Streaming keeps memory flat for large inputs and writes no Arrow cache.
    from datasets import load_dataset

    stream = load_dataset(kind, data_files=path, split="train", streaming=True)
    yield from enumerate(stream, start=1)


# ---------------------------------------------------------------------------
# Field helpers


def field_at(row: dict, path: str) -> Any:
    """The value at the dotted ``path`` of ``row`` ("chosen.content"); BadRow when absent or null."""
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value or value[key] is None:
            raise BadRow("missing_field", f"field {path!r} is missing")
        value = value[key]
    return value


def _score(value: Any, name: str, cfg: DataConfig) -> float:
    if isinstance(value, str):  # "4" or " 3.5" as in the published AMoPO files
        with contextlib.suppress(ValueError):  # a non-numeric string stays a string: bad_score below
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("bad_score", f"score {name!r} must be a finite number, got {value!r}")
    if not cfg.score_min <= value <= cfg.score_max:
        raise BadRow("score_out_of_range", f"score {name!r}={value} is outside [{cfg.score_min}, {cfg.score_max}]")
    return float(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRow("missing_field", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _response(value: Any, name: str) -> str:
    text = _text(value, name)
    if not text.strip():
        raise BadRow("empty_response", f"{name} is empty")
    return text


_HS2_MARK = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def parse_turns(prompt: str) -> list[dict]:
    """Split a HelpSteer2 prompt into chat turns (the first segment is a user turn)."""
    parts = _HS2_MARK.split(prompt)
    turns = [{"role": "user", "content": parts[0]}]
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == "User" else "assistant"
        if role == turns[-1]["role"]:
            raise BadRow("bad_prompt", f"two {role} turns in a row in a multi-turn prompt")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise BadRow("bad_prompt", "the prompt must end with a non-empty user turn")
    return turns


def _prompt_turns(value: Any, name: str) -> list[dict]:
    """A prompt given as a string or as a list of {role, content} messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("bad_prompt", f"{name} is empty")
        return parse_turns(value)
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        turns = [{"role": m["role"], "content": m["content"]} for m in value]
        roles = [t["role"] for t in turns]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
            raise BadRow("bad_prompt", f"{name} must alternate user/assistant messages, starting and ending with user")
        if not all(isinstance(t["content"], str) for t in turns):
            raise BadRow("bad_prompt", f"{name} message contents must be strings")
        return turns
    raise BadRow("bad_prompt", f"{name} must be a string or a list of role/content messages")


def _completion(value: Any, name: str) -> str:
    # TRL-style conversational pairs hold the response as [{"role": "assistant", "content": ...}].
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    return _response(value, name)


# ---------------------------------------------------------------------------
# Chosen/rejected rule


def rule_value(scores: list[float], cfg: DataConfig, extra: Optional[dict] = None) -> float:
    if cfg.pair_rule == "mean":
        return sum(scores) / len(scores)
    if cfg.pair_rule in cfg.dimensions:
        return scores[cfg.dimensions.index(cfg.pair_rule)]
    if extra is None:  # DataConfig allows other attributes only with helpsteer2, whose rows carry them
        raise ValueError(f"--pair-rule {cfg.pair_rule!r} is not a dimension of this run")
    return float(extra[cfg.pair_rule])  # another HelpSteer2 attribute


def order_pair(a: list[float], b: list[float], cfg: DataConfig, ea=None, eb=None) -> int:
    """+1 if a is preferred, -1 if b is, 0 for a tie (pareto: neither dominates)."""
    if cfg.pair_rule == "pareto":
        if all(x >= y for x, y in zip(a, b)) and a != b:
            return 1
        if all(y >= x for x, y in zip(a, b)) and a != b:
            return -1
        return 0
    va, vb = rule_value(a, cfg, ea), rule_value(b, cfg, eb)
    return (va > vb) - (va < vb)


# ---------------------------------------------------------------------------
# Formats


def records(
    rows: Iterable[tuple[int, int, Union[dict, Skip]]], cfg: DataConfig
) -> Iterator[Union[PreferenceRecord, Skip]]:
    """Turn raw rows into records or skips, in input order."""
    if cfg.format == "helpsteer2":
        yield from _helpsteer2(rows, cfg)
        return
    parse = _amopo_row if cfg.format == "amopo" else _pairs_row
    for index, line, row in rows:
        if isinstance(row, Skip):
            yield row
            continue
        try:
            rec = parse(row, cfg, index, line)
        except BadRow as bad:
            yield Skip(bad.reason, line, bad.detail)
            continue
        yield _finish(rec, cfg)


def _finish(rec: PreferenceRecord, cfg: DataConfig) -> Union[PreferenceRecord, Skip]:
    if rec.chosen == rec.rejected:
        return Skip("identical_responses", rec.line, "chosen and rejected responses are identical")
    if cfg.pair_rule == "as-given":
        return rec
    sign = order_pair(rec.chosen_scores, rec.rejected_scores, cfg)
    if sign == 0:
        return Skip("tie", rec.line, f"scores tie under --pair-rule {cfg.pair_rule}")
    if sign < 0:  # the rule prefers the file's "rejected" response
        return PreferenceRecord(
            rec.turns, rec.rejected, rec.chosen, rec.rejected_scores, rec.chosen_scores, rec.row_id, rec.line
        )
    return rec


def _amopo_row(row: dict, cfg: DataConfig, index: int, line: int) -> PreferenceRecord:
    turns = _prompt_turns(field_at(row, "prompt"), "prompt")
    sides = []
    for side in ("chosen", "rejected"):
        obj = field_at(row, side)
        if not isinstance(obj, dict):
            raise BadRow("missing_field", f"{side} must be an object with content and scores")
        key = "content" if "content" in obj else "response"  # ours, then the published code's name
        if key not in obj:
            raise BadRow("missing_field", f"{side} needs the response text under 'content' or 'response'")
        content = _response(field_at(obj, key), f"{side}.{key}")
        scores = [_score(field_at(obj, d), f"{side}.{d}", cfg) for d in cfg.dimensions]
        sides.append((content, scores))
    (c, cs), (r, rs) = sides
    return PreferenceRecord(turns, c, r, cs, rs, index, line)


def _pairs_row(row: dict, cfg: DataConfig, index: int, line: int) -> PreferenceRecord:
    f = cfg.field_paths
    turns = _prompt_turns(field_at(row, f["prompt"]), f["prompt"])
    chosen = _completion(field_at(row, f["chosen"]), f["chosen"])
    rejected = _completion(field_at(row, f["rejected"]), f["rejected"])
    cs = _score(field_at(row, f["score_chosen"]), f["score_chosen"], cfg)
    rs = _score(field_at(row, f["score_rejected"]), f["score_rejected"], cfg)
    return PreferenceRecord(turns, chosen, rejected, [cs], [rs], index, line)


def _helpsteer2_row(row: dict, cfg: DataConfig) -> tuple[str, str, dict]:
    prompt = _text(field_at(row, "prompt"), "prompt")
    response = _response(field_at(row, "response"), "response")
    needed = set(cfg.dimensions) | ({cfg.pair_rule} & set(HELPSTEER2_ATTRS))
    scores = {a: _score(field_at(row, a), a, cfg) for a in HELPSTEER2_ATTRS if a in needed}
    return prompt, response, scores


def _helpsteer2(rows, cfg: DataConfig) -> Iterator[Union[PreferenceRecord, Skip]]:
    """Consecutive rows with the same prompt form one comparison (HelpSteer2 stores two per prompt)."""
    pending: list[tuple[int, int, str, str, dict]] = []
    for index, line, row in rows:
        if isinstance(row, Skip):
            yield row
            continue
        try:
            prompt, response, scores = _helpsteer2_row(row, cfg)
        except BadRow as bad:
            yield Skip(bad.reason, line, bad.detail)
            continue
        if pending and pending[0][2] != prompt:
            yield _helpsteer2_group(pending, cfg)
            pending = []
        pending.append((index, line, prompt, response, scores))
    if pending:
        yield _helpsteer2_group(pending, cfg)


def _helpsteer2_group(rows: list, cfg: DataConfig) -> Union[PreferenceRecord, Skip]:
    index, line, prompt = rows[0][:3]
    if len(rows) < 2:
        return Skip("unpaired", line, "a HelpSteer2 prompt needs two consecutive rated responses")
    try:
        turns = parse_turns(prompt)
    except BadRow as bad:
        return Skip(bad.reason, line, bad.detail)
    # With more than two responses the best and the worst under the rule form the pair.
    vec = lambda r: [r[4][d] for d in cfg.dimensions]  # noqa: E731
    ranked = sorted(rows, key=lambda r: rule_value(vec(r), cfg, r[4]) if cfg.pair_rule != "pareto" else 0.0)
    a, b = ranked[-1], ranked[0]
    if len(rows) == 2:
        a, b = rows
    sign = order_pair(vec(a), vec(b), cfg, a[4], b[4])
    if a[3] == b[3]:
        return Skip("identical_responses", line, "the two responses are identical")
    if sign == 0:
        return Skip("tie", line, f"scores tie under --pair-rule {cfg.pair_rule}")
    chosen, rejected = (a, b) if sign > 0 else (b, a)
    return PreferenceRecord(turns, chosen[3], rejected[3], vec(chosen), vec(rejected), index, line)
