"""The engine is the one place a step runs, and setup_run the one place a run is built (its first step,
setup_model, also the dry run's)."""

import ast
from pathlib import Path

import pytest

from megatron_amopo.config import TrainingConfig

REPO = Path(__file__).resolve().parents[2]
SOURCES = [
    p
    for top in ("megatron_amopo", "tools", "benchmarks", "tests")
    for p in (REPO / top).rglob("*.py")
    if p != Path(__file__).resolve()
] + [REPO / "pretrain_amopo.py"]


def _calls(name: str) -> set[str]:
    """Files with a call of ``name`` (a function or a method, as ``name(...)`` or ``x.name(...)``)."""
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.add(str(path.relative_to(REPO)))
    return found


def test_only_the_engine_runs_the_schedule_and_zeroes_gradient_buffers():
    assert _calls("get_forward_backward_func") == {"megatron_amopo/training/engine.py"}
    assert _calls("zero_grad_buffer") == {"megatron_amopo/training/engine.py"}


def test_only_the_entry_points_and_the_engine_test_build_a_run():
    assert _calls("setup_run") == {
        "megatron_amopo/cli/train.py",
        "megatron_amopo/cli/evaluate.py",
        "tests/distributed/test_engine.py",
    }


def test_every_run_and_the_dry_run_take_their_model_from_one_set_up_step():
    """Training, evaluation, the dry run and the step benchmark: one TransformerConfig for a run."""
    assert _calls("setup_model") == {
        "megatron_amopo/training/run.py",
        "megatron_amopo/training/dry_run.py",
        "benchmarks/bench_train_step.py",
        "tests/unit/test_dry_run.py",
    }
    assert _calls("model_config") == {"megatron_amopo/training/run.py"}


def test_negative_worker_count_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--num-workers must be >= 0, got -1"):
        TrainingConfig(micro_batch_size=1, train_iters=1, num_workers=-1)
