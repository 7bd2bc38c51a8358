"""The README's main job, end to end: examples/cpu_demo.sh on the real SmolLM2-135M-Instruct (Q4_1 GGUF).

Run at a reduced budget (fewer prompts, shorter sequences) so the suite keeps its length. What a few
minutes on 2 cores can honestly show, and what is asserted: every stage runs (import, the HF -> Megatron
logit check, split by prompt, held-out evaluation before and after, DP=2 training, export, generation);
the real model's training-set margins and accuracy rise; held-out metrics exist for every dimension (their
change at this budget is noise, so only their presence is asserted); the replies at verbosity 0 and 4 are
English text, not a degenerate repetition.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3000)]
PAIRS = ("general", "helpfulness", "correctness", "verbosity")
BUDGET = dict(
    TRAIN_PROMPTS="6",
    HELDOUT_PROMPTS="4",
    SEQ_LENGTH="192",
    EPOCHS="2",
    GLOBAL_BATCH="2",
    LR="5e-5",
    MAX_NEW_TOKENS="24",
)


def _reply(path) -> str:
    return open(path).read().split("assistant:", 1)[1].strip()


def test_demo_trains_a_real_model_and_exports(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), **BUDGET)
    # Its own session, so a timeout ends torchrun and its ranks too, not only bash.
    proc = subprocess.Popen(
        ["bash", "examples/cpu_demo.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=2900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert "210 Q4_1" in stdout and "check passed" in stdout
    split = json.load(open(out / "split" / "split.json"))
    assert split["counts"]["heldout"]["prompts"] > 0
    train_prompts = {json.loads(line)["prompt"] for line in open(out / "train_rows.jsonl")}
    heldout_prompts = {json.loads(line)["prompt"] for line in open(out / "heldout_rows.jsonl")}
    assert train_prompts and heldout_prompts and not train_prompts & heldout_prompts

    valid = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    valid = [row for row in valid if row["kind"] == "valid"]
    before, after = valid[0], valid[-1]
    assert before["iteration"] == 0 and after["iteration"] > 0
    # A pretrained model on its own training groups: margins must rise on every pair, accuracy overall.
    for name in PAIRS:
        assert after[f"margin/{name}"] > before[f"margin/{name}"], (name, before, after)
    assert after["margin/all"] > before["margin/all"] + 0.05, (before["margin/all"], after["margin/all"])
    assert after["accuracy/all"] > before["accuracy/all"], (before["accuracy/all"], after["accuracy/all"])
    assert after["loss"] < before["loss"]

    for name in ("heldout_before.json", "heldout_after.json"):
        values = json.load(open(out / name))
        for pair in PAIRS:
            assert 0.0 <= values[f"accuracy/{pair}"] <= 1.0 and abs(values[f"margin/{pair}"]) < 50, (name, pair)
        steer = values["bootstrap"]["steerability/verbosity"]
        assert abs(steer) < 50 and values["bootstrap"]["groups_steer/verbosity"] > 0, name
    assert re.search(r"held-out verbosity steerability [-+]\d\.\d{3} -> [-+]\d\.\d{3}, flip rate", stdout)
    assert any(p.suffix == ".safetensors" for p in (out / "hf_aligned").iterdir())
    for score in (0, 4):
        words = re.findall(r"[A-Za-z]+", _reply(out / f"reply_verbosity{score}.txt"))
        assert len(words) >= 5 and len(set(words)) >= 0.4 * len(words), words
    assert "held-out accuracy" in stdout and "docs/RESULTS.md" in stdout
