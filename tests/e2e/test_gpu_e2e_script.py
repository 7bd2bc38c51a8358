"""benchmarks/gpu_e2e.sh --dry: every flag the prepared GPU run passes exists in its tool's --help.

The full CPU rehearsal (``--cpu``) takes longer than this tier allows on 2 cores (docs/GPU.md);
the dry check catches the usual way a prepared script rots: a renamed or removed flag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_e2e.sh")
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]
COMMANDS = (
    "TINY_MODEL",
    "IMPORT",
    "PREPROCESS",
    "TRAIN",
    "EVALUATE",
    "EXPORT",
    "BIG_MODEL",
    "BIG_IMPORT",
    "SPEED_TRAIN",
    "BENCH",
)


def _dry(script: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", script, "--dry", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )


def test_every_flag_of_every_stage_exists(tmp_path):
    proc = _dry(SCRIPT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in COMMANDS:
        assert f"PASS dry {name}" in proc.stdout
    assert "all steps passed" in proc.stdout
    assert not os.path.exists(tmp_path / "out" / "hf")  # nothing ran


def test_a_renamed_flag_fails_the_dry_check(tmp_path):
    broken = tmp_path / "gpu_e2e.sh"
    text = open(SCRIPT).read()
    train_flags = '--train-iters "$ITERS" --lr 1e-4 --lr-warmup-fraction 0'
    assert text.count(train_flags) == 1
    broken.write_text(text.replace(train_flags, '--train-iters "$ITERS" --lr 1e-4 --lr-warmup 0'))
    shutil.copy(os.path.join(REPO, "benchmarks", "gpu_env.sh"), tmp_path / "gpu_env.sh")
    proc = _dry(str(broken), tmp_path)
    assert proc.returncode == 1
    assert "pretrain_amopo.py has no flag --lr-warmup" in proc.stdout
    assert "FAIL dry TRAIN" in proc.stdout and "PASS dry SPEED_TRAIN" in proc.stdout
