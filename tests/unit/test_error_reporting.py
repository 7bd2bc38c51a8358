"""The one error path of the entry points: which exceptions are user errors, their codes, one line."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from megatron_amopo.config import ParallelConfig
from megatron_amopo.runtime.errors import ExitCode, InputError, entry_point, exit_code


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


def test_codes_of_user_errors_and_bugs():
    assert exit_code(_raised(lambda: ParallelConfig(sequence_parallel=True))) == ExitCode.USAGE  # our ValueError
    assert exit_code(_raised(lambda: np.ones(2) + np.ones(3))) is None  # a library's ValueError is a bug
    assert exit_code(_raised(lambda: open("/nonexistent/x"))) == ExitCode.INPUT
    assert exit_code(OSError(errno.ENOSPC, "No space left on device")) == ExitCode.WRITE
    assert exit_code(FileExistsError("out exists")) == ExitCode.USAGE
    assert exit_code(_raised(lambda: {}["k"])) is None  # KeyError, TypeError...: bugs
    assert exit_code(InputError("x")) == ExitCode.INPUT


def test_entry_point_prints_one_line_on_rank0_and_writes_torchrun_error_file(tmp_path, capsys, monkeypatch):
    @entry_point
    def main() -> int:
        raise InputError("--data-path d has no data.idx", "preprocess it with tools/preprocess_data.py")

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert main() == ExitCode.INPUT
    line = "error: --data-path d has no data.idx — preprocess it with tools/preprocess_data.py"
    assert capsys.readouterr().err == line + "\n"
    assert json.loads((tmp_path / "error.json").read_text())["message"]["message"] == line
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error1.json"))
    assert main() == ExitCode.INPUT and capsys.readouterr().err == ""  # other ranks are silent
    assert (tmp_path / "error1.json").exists()


def test_entry_point_keeps_a_bug_and_debug_shows_the_traceback(capsys, monkeypatch):
    @entry_point
    def bug() -> int:
        return [][1]

    with pytest.raises(IndexError):
        bug()

    @entry_point
    def user() -> int:
        ParallelConfig(sequence_parallel=True)  # a ValueError raised by our validation
        return 0

    monkeypatch.setenv("AMOPO_DEBUG", "1")
    assert user() == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.endswith("drop --sequence-parallel or raise the TP size\n") and err.count("error: ") == 1
