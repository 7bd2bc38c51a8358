"""The installed commands: every ``[project.scripts]`` entry names a ``megatron_amopo.cli`` module's ``main``,
each answers ``--help`` through ``python -m``, and every tools/ script is a thin wrapper around one of them."""

from __future__ import annotations

import importlib
import os
import pkgutil
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_amopo.cli
from megatron_amopo.runtime import quiet

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[2]
# Entry points with their own code still; they move into megatron_amopo/cli/ with the step rewrite (issue 24).
OWN_CODE: set[str] = set()


def _scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]


def _env() -> dict[str, str]:
    """This checkout first on the path; known warnings filtered as a user gets them; wide help lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", quiet.SHOW_ENV)}
    path = [str(REPO), env.get("PYTHONPATH", "")]
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in path if p), "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}


def _help(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *argv, "--help"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_script_is_a_cli_main_named_after_its_module():
    scripts = _scripts()
    assert scripts, "pyproject.toml has no [project.scripts]"
    for command, target in scripts.items():
        module, _, attr = target.partition(":")
        assert attr == "main" and module.startswith("megatron_amopo.cli."), (command, target)
        assert command == "amopo-" + module.rsplit(".", 1)[1].replace("_", "-"), (command, target)
        main = getattr(importlib.import_module(module), attr)
        assert callable(main) and hasattr(main, "__wrapped__"), f"{target} is not wrapped by @entry_point"
    modules = {m.name for m in pkgutil.iter_modules(megatron_amopo.cli.__path__)}
    registered = {target.partition(":")[0].rsplit(".", 1)[1] for target in scripts.values()}
    assert modules == registered, f"cli modules without a command: {modules - registered}"


def test_every_command_answers_help_through_python_m():
    scripts = _scripts()
    procs = {command: _help("-m", target.partition(":")[0]) for command, target in scripts.items()}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        module = importlib.import_module(scripts[command].partition(":")[0])
        assert proc.returncode == 0, (command, err[-2000:])
        assert out.startswith("usage: ") and module.__doc__.splitlines()[0] in out, (command, out[:500])
        assert err == "", (command, err[-2000:])  # no warning, known or not, on the way to --help


def test_tools_scripts_are_thin_wrappers_of_the_commands():
    command_of = {target.partition(":")[0]: command for command, target in _scripts().items()}
    readme = (REPO / "README.md").read_text()
    for path in sorted((REPO / "tools").glob("*.py")):
        if path.name in OWN_CODE:
            continue
        main = runpy.run_path(str(path), run_name="wrapper")["main"]
        assert main.__module__ in command_of, f"{path.name} runs {main.__module__}, which is no installed command"
        assert main is importlib.import_module(main.__module__).main
        assert len(path.read_text().splitlines()) <= 15, f"{path.name} should only import and call main"
        row = f"| `{command_of[main.__module__]}` | `python tools/{path.name}` |"
        assert row in readme, f"README's installed commands table lacks {row}"


def test_wrapper_and_module_print_the_same_help():
    wrapper, module = _help("tools/convert_hf_to_megatron.py"), _help("-m", "megatron_amopo.cli.import_hf")
    (w_out, w_err), (m_out, m_err) = wrapper.communicate(timeout=120), module.communicate(timeout=120)
    assert wrapper.returncode == module.returncode == 0, w_err + m_err
    assert w_out.replace("convert_hf_to_megatron.py", "PROG") == m_out.replace("import_hf.py", "PROG")
