"""What a user sees when something is wrong: one ``error:`` line and a distinct exit code from the
real entry points (runtime/errors.py), torchrun's output kept short, and a full disk that loses
nothing (training/disk.py). The full-disk cases mount a real small tmpfs (root only)."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from test_training import SEQ, common, setup, torchrun  # noqa: F401  (the tiny Qwen2 model and data)

from megatron_amopo.runtime.comm import free_port
from megatron_amopo.runtime.errors import ExitCode
from megatron_amopo.testing.pipeline import PY, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# torchrun's own lines around one worker error with 2 ranks, measured with torch 2.13: its logged
# "failed (exitcode ...)" and "no error file defined for parent" lines, the ChildFailedError traceback
# (17 lines) and the failure box (21 lines, whose root cause shows our message from the error file).
TORCHRUN_LINES = 42


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _train(setup, save, *flags: str, **env) -> subprocess.CompletedProcess:  # noqa: F811
    """pretrain_amopo.py as one process (no torchrun): its own exit code reaches the shell."""
    args = [PY, "pretrain_amopo.py", *common(setup, save, "--global-batch-size", "1", *flags)]
    environ = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="", **env)
    if "AMOPO_DEBUG" not in env:
        environ.pop("AMOPO_DEBUG", None)
    return subprocess.run(args, cwd=REPO, env=environ, capture_output=True, text=True, timeout=400)


def test_torchrun_user_error_is_one_line_and_names_the_cause_in_the_box(setup):  # noqa: F811
    missing = setup / "nothing"
    proc = torchrun(*common(setup, setup / "bad_load", "--train-iters", "2", "--load", str(missing)), check=False)
    assert proc.returncode != 0  # torchrun exits 1 whatever its workers return
    line = f"error: no checkpoint at {missing}: directory does not exist"
    assert [x for x in _errors(proc.stderr) if x.startswith(line)] == _errors(proc.stderr)
    assert len(_errors(proc.stderr)) == 1, proc.stderr  # rank 0 only
    assert "megatron_amopo" not in proc.stderr  # no traceback through our code
    assert f"traceback : {line}" in proc.stderr  # torchrun's box names the root cause
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 1 + TORCHRUN_LINES + 4, proc.stderr  # was 66 lines before; + OMP banner slack


def test_usage_error_one_line_exit_2_and_debug_traceback(setup):  # noqa: F811
    proc = _train(setup, setup / "tp3", "--train-iters", "1", "--tensor-model-parallel-size", "3")
    assert proc.returncode == ExitCode.USAGE, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == _errors(proc.stderr)
    assert len(_errors(proc.stderr)) == 1 and "world size 1 is not divisible" in proc.stderr
    bad_flag = _train(setup, setup / "tp3", "--train-iters", "x")
    assert bad_flag.returncode == ExitCode.USAGE and len(bad_flag.stderr.strip().splitlines()) == 1
    assert "argument --train-iters: invalid int value: 'x' — see pretrain_amopo.py --help" in bad_flag.stderr
    debug = _train(setup, setup / "tp3", "--train-iters", "1", "--tensor-model-parallel-size", "3", AMOPO_DEBUG="1")
    assert debug.returncode == ExitCode.USAGE and "Traceback (most recent call last)" in debug.stderr
    assert not (setup / "tp3").exists()


@contextlib.contextmanager
def _tmpfs(path, size_bytes: int):
    """A real filesystem of ``size_bytes`` at ``path`` (root only; the test is skipped otherwise)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _tree_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_full_disk_pre_flight_save_failure_and_stale_staging(setup, tmp_path):  # noqa: F811
    from megatron_amopo.checkpoint.store import read_model_metadata
    from megatron_amopo.training.disk import checkpoint_bytes

    one = checkpoint_bytes(read_model_metadata(str(setup / "init")).arch, bf16=False)
    meta = _tree_bytes(setup / "init") - _tree_bytes(setup / "init" / "iter_0000000")  # metadata + tokenizer
    assert 0.8 < _tree_bytes(setup / "init" / "iter_0000000") / (one / 3) < 1.25  # weights only: 4 of 12 bytes
    # Room for the metadata and 1.5 checkpoints: the pre-flight refuses, the first save fits, the second does not.
    with _tmpfs(tmp_path / "small", meta + int(1.5 * one)) as small:
        save = small / "run"
        refused = _train(setup, save, "--train-iters", "2", "--save-interval", "1")
        assert refused.returncode == ExitCode.REFUSED, refused.stderr[-3000:]
        assert _errors(refused.stderr) == refused.stderr.strip().splitlines()[-1:]
        assert "disk pre-flight: --save" in refused.stderr and "--no-disk-check" in refused.stderr
        assert os.listdir(small) == []  # refused before anything was written

        full = _train(setup, save, "--train-iters", "2", "--save-interval", "1", "--no-disk-check")
        assert full.returncode == ExitCode.WRITE, full.stderr[-3000:]
        (line,) = _errors(full.stderr)
        assert line.startswith("error: no space left on tmpfs (") and f"while saving iteration 2 to {save}" in line
        assert "the last complete checkpoint is iteration 1 — free space or use another --save" in line
        assert "warning: disk pre-flight" in full.stderr and "Traceback" not in full.stderr
        assert sorted(p for p in os.listdir(save) if p.startswith((".tmp", "iter_"))) == ["iter_0000001"]
        assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"

        stale = save / ".tmp_iter_0000009"  # what a killed save leaves behind
        stale.mkdir()
        (stale / "junk").write_bytes(b"x" * 1000)
        again = _train(setup, save, "--train-iters", "2", "--save-interval", "1")
        assert again.returncode == ExitCode.REFUSED and f"removed {stale}" in again.stderr
        assert not stale.exists()
