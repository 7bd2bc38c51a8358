"""benchmarks/bench_train_step.py end to end on the tiny shape (CPU), plus its FLOPs formula.

The benchmark runs both sides in subprocesses: ours (Megatron model, optimizer, step.py
schedule) started from the baseline's initial weights (--same-weights) must give the
baseline's first-step loss, which ties the two measurements to the same computation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "bench_train_step.py"
_SPEC = importlib.util.spec_from_file_location("bench_train_step", BENCH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_flops_formula_counts_every_matmul_weight():
    """6 N_mm L term: N_mm = the Linear weights of the HF model (LM head included, embedding lookup not)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = bench.hf_config("tiny")
    hf = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "qwen2", **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
        )
    )
    n_mm = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    layers, d_attn = cfg["num_hidden_layers"], cfg["hidden_size"]
    assert bench.model_flops(cfg, [1]) == 6 * n_mm + 6 * layers * d_attn
    assert bench.model_flops(cfg, [10, 20]) == 6 * n_mm * 30 + 6 * layers * d_attn * (100 + 400)
    # Qwen2.5-1.5B: about 1.54 B parameters, 0.23 B of them the (tied) embedding used as LM head
    full = bench.MODELS["qwen2.5-1.5b"]
    assert 6 * 1.5e9 < bench.model_flops(full, [1]) < 6 * 1.6e9


def test_groups_fit_the_row_length():
    groups = bench.make_groups(3, dims=2, seq_length=64, vocab=100, seed=0)
    assert len(groups) == 3 and all(len(g.tokens) == 6 for g in groups)
    for g in groups:
        prompt = g.tokens[0][: int(g.response_start[0])]
        assert all(len(s) - 1 <= 64 and torch.equal(s[: len(prompt)], prompt) for s in g.tokens)


@pytest.mark.e2e
def test_tiny_benchmark_runs_and_sides_agree(tmp_path):
    out = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--model",
        "tiny",
        "--seq-length",
        "64",
        "--micro-batch",
        "2",
        "--num-microbatches",
        "2",
        "--dims",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--same-weights",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    ours, base = s["results"]
    assert (ours["side"], base["side"]) == ("ours", "baseline")
    assert (
        ours["attention"]
        in (("sdpa/packed-thd", "sdpa/packed-mask") if torch.cuda.is_available() else ("sdpa/packed-mask",))
        and base["attention"] == "hf-sdpa"
    )
    assert s["samples_per_step"] == 4 and s["real_tokens_per_step"] > 0
    # same weights, same data, same objective: the same first loss (fp32 on CPU; bf16 on GPU)
    cuda = torch.cuda.is_available()
    assert math.isfinite(ours["first_loss"]) and ours["first_loss"] > 0
    assert ours["first_loss"] == pytest.approx(base["first_loss"], rel=5e-2 if cuda else 1e-4)
    assert ours["rows"] < base["rows"] == 4 * 2 * 3  # packed rows vs one padded row per sequence
    for r in (ours, base):
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0
        assert (r["mfu"] is None) == (not cuda)
    assert s["speedup"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"])
    assert "ours / baseline: throughput x" in proc.stdout
