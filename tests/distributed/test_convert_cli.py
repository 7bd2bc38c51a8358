"""The conversion tools end to end, as a user runs them, with the bundled real Qwen2 tokenizer.

a tiny Qwen2 (vocabulary covering the tokenizer, tied embeddings) ->
convert_hf_to_megatron --check -> convert_megatron_to_hf --check with small shards
-> transformers loads the export with its tokenizer and generates the same tokens
as the original model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer-qwen2")


def _tool(name: str, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _report(stdout: str) -> dict:
    start = stdout.index("{")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.isfile(os.path.join(TOKENIZER, "vocab.json")), reason="bundled tokenizer missing")
def test_tools_end_to_end_with_real_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_amopo.convert.tiny_hf import make_tiny_hf_model

    hf, mc, out = tmp_path / "hf", tmp_path / "mcore", tmp_path / "export"
    make_tiny_hf_model(str(hf), "qwen2", tied=True, tokenizer=TOKENIZER, vocab_size=151680, seed=5)

    # Threshold 0 shows that a failed check exits non-zero; the report must still be within 1e-4.
    res = _tool("convert_hf_to_megatron", "--hf-path", hf, "--save", mc, "--check", "--check-threshold", "0")
    assert res.returncode == 1 and "check FAILED: max |Δlogit|" in res.stderr, res.stderr[-3000:]
    report = _report(res.stdout)
    assert 0 < report["max_abs"] <= 1e-4 and report["unpadded"]["argmax_agreement"] == 1.0
    assert sorted(os.listdir(mc / "tokenizer")) == sorted(
        f
        for f in os.listdir(TOKENIZER)
        if f
        in (
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
            "tokenizer.json",
        )
    )
    res = _tool("convert_megatron_to_hf", "--load", mc, "--save", out, "--check", "--max-shard-size", "15MB")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _report(res.stdout)["max_abs"] <= 1e-4
    assert (out / "model.safetensors.index.json").exists()  # 151680 x 64 fp32 embedding alone is 38.8 MB

    # The export generates exactly like the original (greedy decoding from a real prompt).
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Preference optimisation", return_tensors="pt")["input_ids"]
    gens = []
    for d in (hf, out):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        gens.append(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0])
    assert torch.equal(gens[0], gens[1]) and len(gens[1]) == ids.shape[1] + 6

    res = _tool("convert_megatron_to_hf", "--load", mc, "--save", out)
    assert res.returncode == 2 and "exists and is not empty; pass --overwrite" in res.stderr
