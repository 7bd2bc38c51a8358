"""Question and answer files of the paper's benchmarks, and an answer file that survives interruption.

Formats (field names as the benchmarks' own files and judges use them):

- ``alpaca_eval``: the eval set is a JSON list of ``{instruction, dataset, ...}``; the judge reads
  ``model_outputs.json``, a JSON list of ``{instruction, output, generator, dataset}``.
- ``arena_hard`` (Arena-Hard-Auto v0.1): ``question.jsonl`` rows ``{question_id, category, cluster,
  turns: [{content}]}``; answers ``{question_id, answer_id, model_id, choices: [{index, turns:
  [{content, token_len}]}], tstamp}``.
- ``mt_bench`` (FastChat llm_judge): ``question.jsonl`` rows ``{question_id, category, turns: [str, str]}``;
  answers ``{question_id, answer_id, model_id, choices: [{index, turns: [str, str]}], tstamp}``, the
  second turn answered with the first answer in the conversation.
- ``jsonl``: rows ``{prompt, id?}``; answers ``{id, prompt, output, generator}``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

FORMATS = ("alpaca_eval", "arena_hard", "mt_bench", "jsonl")


@dataclass
class Question:
    """One benchmark question: its key (unique, a string), its user turns and its row."""

    key: str
    turns: list[str]
    row: dict


def _load_rows(path: str) -> list[Any]:
    """A JSON list, or one JSON value per line."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return list(rows)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows


def sniff(row: Any) -> str:
    """The format a question row looks like (or a description of what it is instead)."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    if "choices" in row or ("output" in row and "instruction" not in row):  # AlpacaEval's set has outputs
        return "an answer file, not a question file"
    turns = row.get("turns")
    if "question_id" in row and isinstance(turns, list) and turns:
        if all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns):
            return "arena_hard"
        if all(isinstance(t, str) for t in turns):
            return "mt_bench"
    if isinstance(row.get("instruction"), str):
        return "alpaca_eval"
    if isinstance(row.get("prompt"), str):
        return "jsonl"
    return f"unknown (keys {sorted(row)})"


def _question(row: dict, fmt: str, index: int) -> Question:
    if fmt == "alpaca_eval":
        return Question(str(index), [row["instruction"]], row)  # the eval set has no id: its position is one
    if fmt == "arena_hard":
        return Question(str(row["question_id"]), [t["content"] for t in row["turns"]], row)
    if fmt == "mt_bench":
        return Question(str(row["question_id"]), list(row["turns"]), row)
    return Question(str(row.get("id", index)), [row["prompt"]], row)


def read_questions(path: str, fmt: str) -> list[Question]:
    """Every question of a ``fmt`` question file; a file of another format is refused, naming it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    rows = _load_rows(path)
    if not rows:
        raise ValueError(f"--input {path} holds no questions")
    questions = []
    for i, row in enumerate(rows):
        kind = sniff(row)
        if kind != fmt:
            raise ValueError(
                f"--input {path}, question {i + 1}: expected a {fmt} question, but this row looks like {kind}; "
                + (f"use --format {kind}" if kind in FORMATS else f"see docs/EVALUATION.md for the {fmt} fields")
            )
        questions.append(_question(row, fmt, i))
    keys = [q.key for q in questions]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"--input {path}: question id {dup!r} appears twice; ids must be unique")
    return questions


def make_answer(fmt: str, q: Question, replies: list[str], token_lens: list[int], model_id: str) -> dict:
    """The answer row the benchmark's judge reads for question ``q``."""
    if fmt == "alpaca_eval":
        out = {"instruction": q.row["instruction"], "output": replies[0], "generator": model_id}
        return {**out, "dataset": q.row["dataset"]} if "dataset" in q.row else out
    if fmt == "jsonl":
        return {
            "id": q.row["id"] if "id" in q.row else int(q.key),
            "prompt": q.row["prompt"],
            "output": replies[0],
            "generator": model_id,
        }
    if fmt == "arena_hard":
        turns: list[Any] = [{"content": r, "token_len": n} for r, n in zip(replies, token_lens)]
    else:
        turns = list(replies)
    return {
        "question_id": q.row["question_id"],
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


def _answer_key(fmt: str, answer: dict) -> str:
    return str(answer["id"] if fmt == "jsonl" else answer["question_id"])


def _answer_model(answer: dict) -> Optional[str]:
    return answer.get("generator", answer.get("model_id"))


class AnswerStore:
    """Answers written one JSON line at a time (flushed and fsynced), so an interrupted run keeps
    every finished answer and a rerun skips them: nothing is generated or written twice.

    JSONL formats append to ``--output`` itself (as Arena-Hard's and FastChat's generators do);
    ``alpaca_eval`` appends to ``OUTPUT.partial.jsonl`` and writes the JSON list when all are done.
    ``finish`` rewrites the output in question order, atomically.
    """

    def __init__(self, path: str, fmt: str, questions: list[Question], model_id: str) -> None:
        self.path, self.fmt, self.questions = path, fmt, questions
        self.lines_path = path + ".partial.jsonl" if fmt == "alpaca_eval" else path
        self.done: dict[str, dict] = {}
        known = {q.key for q in questions}
        for key, answer in self._existing():
            if key not in known:
                raise ValueError(
                    f"--output {path} already holds an answer to question {key!r}, which --input does not have; "
                    "choose another --output (or delete it to start over)"
                )
            if _answer_model(answer) != model_id:
                raise ValueError(
                    f"--output {path} holds answers of model {_answer_model(answer)!r}, not --model-id {model_id!r}; "
                    "choose another --output or the same --model-id"
                )
            self.done[key] = answer

    def _existing(self) -> list[tuple[str, dict]]:
        if self.fmt == "alpaca_eval" and os.path.isfile(self.path) and not os.path.isfile(self.lines_path):
            with open(self.path, encoding="utf-8") as fh:
                answers = json.load(fh)  # a finished run; alpaca keys are positions in the eval set
            by_instruction = {q.row["instruction"]: q.key for q in self.questions}
            return [(by_instruction.get(a["instruction"], a["instruction"]), a) for a in answers]
        if not os.path.isfile(self.lines_path):
            return []
        with open(self.lines_path, encoding="utf-8") as fh:
            text = fh.read()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif lines:  # a line cut off by the interruption: dropped, its question is asked again
            lines.pop()
            _atomic_write(self.lines_path, "".join(line + "\n" for line in lines))
        rows = [json.loads(line) for line in lines if line.strip()]
        if self.fmt == "alpaca_eval":
            return [(r["key"], r["answer"]) for r in rows]
        return [(_answer_key(self.fmt, r), r) for r in rows]

    def pending(self) -> list[Question]:
        return [q for q in self.questions if q.key not in self.done]

    def add(self, answers: list[tuple[Question, dict]]) -> None:
        with open(self.lines_path, "a", encoding="utf-8") as fh:
            for q, answer in answers:
                row = {"key": q.key, "answer": answer} if self.fmt == "alpaca_eval" else answer
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.done[q.key] = answer
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self) -> None:
        """All questions answered: write the judge's file in question order."""
        ordered = [self.done[q.key] for q in self.questions]
        if self.fmt == "alpaca_eval":
            _atomic_write(self.path, json.dumps(ordered, ensure_ascii=False, indent=2) + "\n")
            if os.path.isfile(self.lines_path):
                os.remove(self.lines_path)
        else:
            _atomic_write(self.path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in ordered))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
