"""runtime/quiet.py: known third-party warnings are filtered, everything else still prints."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from megatron_amopo.runtime import quiet


def _emit(message: str, module: str, category=UserWarning) -> None:
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


@pytest.fixture
def fresh(monkeypatch):
    """A clean filter list and an uninstalled quiet module; both restored afterwards."""
    monkeypatch.setattr(quiet, "_INSTALLED", False)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        yield caught


def test_known_warning_is_filtered_and_unknown_ones_print(fresh, monkeypatch):
    monkeypatch.delenv(quiet.SHOW_ENV, raising=False)
    quiet.install()
    _emit("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends")
    _emit(
        "`load_state_dict` is deprecated and will be removed",
        "megatron.core.dist_checkpointing.strategies.torch",
        FutureWarning,
    )
    _emit("something nobody has seen before", "megatron.core.models.backends")  # unknown message of a known module
    _emit("Apex is not installed. Falling back to Torch Norm", "someone_else")  # known message, other module
    warnings.warn("our own warning", stacklevel=1)
    assert [str(w.message) for w in fresh] == [
        "something nobody has seen before",
        "Apex is not installed. Falling back to Torch Norm",
        "our own warning",
    ]


def test_show_env_shows_everything(fresh, monkeypatch):
    monkeypatch.setenv(quiet.SHOW_ENV, "1")
    quiet.install()
    _emit("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends")
    assert [str(w.message) for w in fresh] == ["Apex is not installed. Falling back to Torch Norm"]


def test_every_known_entry_has_a_reason():
    for k in quiet.KNOWN:
        assert k.reason and k.message, k


def test_rank_prefix_on_every_line(fresh, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    quiet.install()
    text = warnings.formatwarning("odd thing", UserWarning, "x.py", 3, "line")
    assert text.splitlines() and all(line.startswith("[rank 1] ") for line in text.splitlines())


def _import_megatron_after_cli(**env: str) -> str:
    """stderr of a process that imports the cli package (as every command does), then Megatron-Core's specs."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", quiet.SHOW_ENV)}
    code = "import megatron_amopo.cli, megatron.core.models.gpt.gpt_layer_specs"
    proc = subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_the_cli_package_filters_before_any_command_imports_megatron():
    known = "Apex is not installed. Falling back to Torch Norm"
    assert known in _import_megatron_after_cli(**{quiet.SHOW_ENV: "1"})  # the warning is there to hide
    assert known not in _import_megatron_after_cli()
