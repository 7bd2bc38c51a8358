"""The README's main job, end to end: examples/cpu_quickstart.sh must run, learn, export,
generate and plot. Training-set preference accuracy must clearly rise."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


def test_quickstart_learns_and_exports(tmp_path):
    out = tmp_path / "quickstart"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", "examples/cpu_quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    valid = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    valid = [row for row in valid if row["kind"] == "valid"]
    before, after = valid[0], valid[-1]
    assert before["iteration"] == 0 and after["iteration"] > 0
    # A random model is at chance on its training pairs; training must make it clearly prefer the chosen side.
    assert before["accuracy/all"] <= 0.8, before
    assert after["accuracy/all"] >= 0.9, after
    for name in ("general", "helpfulness", "correctness", "coherence"):
        assert after[f"accuracy/{name}"] >= 0.85, (name, after)
    assert after["loss"] < before["loss"]
    for plot in ("loss", "weights", "margins", "accuracy"):
        assert (out / "run" / "plots" / f"{plot}.png").stat().st_size > 1000
    assert (out / "hf_aligned" / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in (out / "hf_aligned").iterdir())
    assert "assistant:" in proc.stdout and "Quickstart finished" in proc.stdout
