"""What a user sees: the entry points print no known third-party warning (AMOPO_SHOW_WARNINGS=1
shows them), long operations show progress, and the memory pre-flight refuses a run that will
not fit before the model is built."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from test_training import setup  # noqa: F401  (the same tiny Qwen2 model, converted, and HelpSteer2 data)

from megatron_amopo.runtime import quiet
from megatron_amopo.runtime.comm import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


def _run(args: list[str], check: bool = True, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", quiet.SHOW_ENV)}
    environ.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_PORT=str(free_port()), **env)
    proc = subprocess.run(args, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _known_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(k.message, line) for k in quiet.KNOWN)]


def test_converter_is_quiet_shows_progress_and_the_env_shows_all(setup):
    quiet_run = _run(
        [PY, "tools/convert_hf_to_megatron.py", "--hf-path", str(setup / "hf"), "--save", str(setup / "init_quiet")]
    )
    assert _known_lines(quiet_run.stdout + quiet_run.stderr) == []
    assert "HF -> Megatron: 100%" in quiet_run.stderr and "tensors" in quiet_run.stderr
    loud = _run(
        [PY, "tools/convert_hf_to_megatron.py", "--hf-path", str(setup / "hf"), "--save", str(setup / "init_loud")],
        **{quiet.SHOW_ENV: "1"},
    )
    assert any("Transformer Engine and Apex are not installed" in line for line in _known_lines(loud.stderr))


def _train(setup, save: str, *flags: str, **env) -> subprocess.CompletedProcess:
    return _run(
        [
            PY,
            "pretrain_amopo.py",
            "--load",
            str(setup / "init"),
            "--save",
            str(setup / save),
            "--data-path",
            str(setup / "data"),
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "1",
            "--seq-length",
            "256",
            "--train-iters",
            "1",
            *flags,
        ],
        check=False,
        **env,
    )


def test_preflight_refuses_before_the_model_and_a_fitting_run_trains(setup):
    refused = _train(setup, "refused", AMOPO_MEMORY_LIMIT_GIB="0.05")
    assert refused.returncode == 5, refused.stderr[-3000:]  # ExitCode.REFUSED
    assert "will not fit" in refused.stderr and "AMOPO_MEMORY_LIMIT_GIB=0.05" in refused.stderr
    assert "--no-memory-check" in refused.stderr
    assert not (setup / "refused").exists()  # refused before the model, the checkpoint or the save directory
    ran = _train(setup, "ran", "--eval-interval", "1", "--valid-data-path", str(setup / "data"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "memory pre-flight: estimated peak per rank" in ran.stdout
    assert "evaluate: 100%" in ran.stderr  # progress of each evaluation, per micro-batch
    assert _known_lines(ran.stdout + ran.stderr) == []
