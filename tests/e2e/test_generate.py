"""End to end: tools/generate.py answers benchmark question files (tests/data/benchmarks, written from
each benchmark's format) with a tiny random Qwen2 model and the real Qwen2 tokenizer, on CPU (HF backend)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest

from megatron_amopo.testing.pipeline import PY, REPO, run_tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
BENCH = os.path.join(REPO, "tests", "data", "benchmarks")
TOKENS = "6"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "tiny-qwen2"
    run_tool(
        # Untied: a tiny tied model echoes its last input token (answers of newlines prove nothing).
        [PY, "tools/make_tiny_model.py", "--arch", "qwen2", "--tokenizer", "data/tokenizer-qwen2"]
        + ["--vocab-size", "151680", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-layers", "2"]
        + ["--out", str(out)]
    )
    return out


def generate(model, *flags: str, **kw):
    return run_tool([PY, "tools/generate.py", "--model", str(model), "--max-new-tokens", TOKENS, *flags], **kw)


def read_jsonl(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def greedy(model, messages: list[dict]) -> str:
    """The reference: one conversation through HF generate, unbatched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**ids, max_new_tokens=int(TOKENS), do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_mt_bench_two_turns_with_the_dimension_prompt(model, tmp_path):
    out = tmp_path / "mt.jsonl"
    generate(
        model,
        "--input",
        f"{BENCH}/mt_bench_question.jsonl",
        "--output",
        str(out),
        "--format",
        "mt_bench",
        "--dimension",
        "correctness",
        "--score",
        "3",
        "--batch-size",
        "2",
        "--model-id",
        "tiny",
    )
    answers = read_jsonl(out)
    assert [a["question_id"] for a in answers] == [81, 101]
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and a["model_id"] == "tiny"
        assert len(a["choices"]) == 1 and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in a["choices"][0]["turns"])
    # Both turns reproduced one conversation at a time, the system message from the preprocessing prompt
    # builder, the second turn after the model's own first answer.
    from megatron_amopo.data.prompts import PromptBuilder, load_templates

    system = PromptBuilder(load_templates(None), ["helpfulness", "correctness", "coherence"], 0, 4).dimension(1, 3)
    q = read_jsonl(f"{BENCH}/mt_bench_question.jsonl")[0]
    first, second = answers[0]["choices"][0]["turns"]
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": q["turns"][0]}]
    assert first == greedy(model, msgs)
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": q["turns"][1]}]
    assert second == greedy(model, msgs)


def test_alpaca_eval_arena_hard_and_jsonl_answer_files(model, tmp_path):
    alpaca = tmp_path / "model_outputs.json"
    generate(model, "--input", f"{BENCH}/alpaca_eval.json", "--output", str(alpaca), "--format", "alpaca_eval")
    with open(alpaca) as fh:
        rows = json.load(fh)
    with open(f"{BENCH}/alpaca_eval.json") as fh:
        questions = json.load(fh)
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in questions]
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in rows)
    assert {r["generator"] for r in rows} == {"tiny-qwen2"} and all(r["output"] for r in rows)
    assert not os.path.exists(str(alpaca) + ".partial.jsonl")

    arena = tmp_path / "arena.jsonl"
    generate(model, "--input", f"{BENCH}/arena_hard_question.jsonl", "--output", str(arena), "--format", "arena_hard")
    answers = read_jsonl(arena)
    assert [a["question_id"] for a in answers] == [
        q["question_id"] for q in read_jsonl(f"{BENCH}/arena_hard_question.jsonl")
    ]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    for a in answers:
        (turn,) = a["choices"][0]["turns"]
        assert set(turn) == {"content", "token_len"} and turn["content"].strip()
        assert turn["token_len"] == len(tok(turn["content"], add_special_tokens=False)["input_ids"])

    batched, single = tmp_path / "b.jsonl", tmp_path / "s.jsonl"
    generate(
        model, "--input", f"{BENCH}/prompts.jsonl", "--output", str(batched), "--format", "jsonl", "--batch-size", "3"
    )
    generate(
        model, "--input", f"{BENCH}/prompts.jsonl", "--output", str(single), "--format", "jsonl", "--batch-size", "1"
    )
    rows = read_jsonl(batched)
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"] and set(rows[0]) == {"id", "prompt", "output", "generator"}
    assert rows == read_jsonl(single)  # greedy: left-padded batches answer as one question at a time


def test_an_interrupted_run_resumes_without_writing_anything_twice(model, tmp_path):
    # The first two questions answered, then the run stopped while writing the third answer's line.
    questions = read_jsonl(f"{BENCH}/arena_hard_question.jsonl")
    first_two = tmp_path / "first_two.jsonl"
    first_two.write_text("".join(json.dumps(q) + "\n" for q in questions[:2]))
    out = tmp_path / "arena.jsonl"
    generate(model, "--input", str(first_two), "--output", str(out), "--format", "arena_hard")
    before = read_jsonl(out)
    with open(out, "a") as fh:
        fh.write('{"question_id": "b5c7d9e1f3a54b6c8d0e2f4a6b8c0d2e", "answer_id": "cut')
    proc = generate(
        model, "--input", f"{BENCH}/arena_hard_question.jsonl", "--output", str(out), "--format", "arena_hard"
    )
    assert "3 questions, 2 already answered" in proc.stdout
    after = read_jsonl(out)
    assert [a["question_id"] for a in after] == [q["question_id"] for q in questions]
    assert after[:2] == before  # kept as written (same answer ids), not generated again
    proc = generate(
        model, "--input", f"{BENCH}/arena_hard_question.jsonl", "--output", str(out), "--format", "arena_hard"
    )
    assert "3 already answered" in proc.stdout and read_jsonl(out) == after

    # AlpacaEval's answer file is one JSON list: answers collect in OUTPUT.partial.jsonl until all are done.
    alpaca = tmp_path / "model_outputs.json"
    partial = tmp_path / "model_outputs.json.partial.jsonl"
    shutil.copy(f"{BENCH}/alpaca_eval.json", tmp_path / "eval.json")
    kept = {
        "instruction": "What are the names of some famous actors that started their careers on Broadway?",
        "output": "kept from the first run",
        "generator": "tiny-qwen2",
        "dataset": "helpful_base",
    }
    partial.write_text(json.dumps({"key": "0", "answer": kept}) + "\n")
    proc = generate(model, "--input", str(tmp_path / "eval.json"), "--output", str(alpaca), "--format", "alpaca_eval")
    assert "3 questions, 1 already answered" in proc.stdout
    with open(alpaca) as fh:
        rows = json.load(fh)
    assert rows[0] == kept and len(rows) == 3 and not partial.exists()


def _tool_main():
    spec = importlib.util.spec_from_file_location("generate_tool", os.path.join(REPO, "tools", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--input", f"{BENCH}/mt_bench_question.jsonl", "--format", "arena_hard"],
            "looks like mt_bench; use --format mt_bench",
        ),
        (["--input", f"{BENCH}/arena_hard_question.jsonl", "--format", "alpaca_eval"], "looks like arena_hard"),
        (["--input", f"{BENCH}/alpaca_eval.json", "--format", "jsonl"], "looks like alpaca_eval"),
        (["--input", f"{BENCH}/prompts.jsonl", "--format", "jsonl", "--backend", "vllm"], "pip install -e '.[vllm]'"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed here anyway; keeps the case true everywhere
    main = _tool_main()
    # --model does not exist: any attempt to load it would fail with another message.
    assert main(["--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o.jsonl"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_unknown_format_and_answer_files_as_input(tmp_path, capsys):
    main = _tool_main()
    assert main(["--model", "x", "--input", f"{BENCH}/prompts.jsonl", "--output", "o", "--format", "vicuna"]) == 2
    assert "invalid choice: 'vicuna'" in capsys.readouterr().err
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "model_id": "m", "choices": []}) + "\n")
    assert main(["--model", "x", "--input", str(answers), "--output", str(tmp_path / "o"), "--format", "mt_bench"]) == 2
    assert "an answer file, not a question file" in capsys.readouterr().err
