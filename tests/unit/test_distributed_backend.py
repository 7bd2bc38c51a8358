"""The default process group's backend when CUDA is reported available (monkeypatched; no GPU here).

The trainer all-reduces CPU tensors every step (metrics, counts, the stop flag), which a plain
``nccl`` group cannot take ("No backend type associated with device type cpu"): on CUDA the
group must be ``cpu:gloo,cuda:nccl``, for the default and for ``--distributed-backend nccl``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig

from megatron_amopo.config import ParallelConfig, run_arg_parser, run_config_from_args
from megatron_amopo.runtime import distributed
from megatron_amopo.runtime.distributed import DistEnv, initialize_distributed, process_group_backend


class _Started(Exception):
    """Raised by the recorder in place of starting a process group."""


@pytest.fixture
def init_calls(monkeypatch) -> list[dict]:
    """Record ``init_process_group``'s arguments and stop there (nothing is started)."""
    calls: list[dict] = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise _Started

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", record)
    return calls


def _report_cuda(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def _backend_from_flags(flags: list[str], init_calls: list[dict]) -> str:
    args = run_arg_parser("t").parse_args(["--train-iters", "1", "--micro-batch-size", "1", *flags])
    cfg = run_config_from_args(args)
    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(_Started):
        initialize_distributed(cfg.parallel, env)
    return init_calls[-1]["backend"]


@pytest.mark.parametrize("flags", [[], ["--distributed-backend", "nccl"]], ids=["default", "explicit-nccl"])
def test_cuda_gets_nccl_with_a_gloo_side_for_cpu_tensors(monkeypatch, init_calls, flags):
    _report_cuda(monkeypatch, True)
    backend = _backend_from_flags(flags, init_calls)
    assert backend == "cpu:gloo,cuda:nccl"
    # torch parses it into one backend per device type: CPU tensors go to gloo
    assert BackendConfig(Backend(backend)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_explicit_gloo_stays_gloo_on_cuda(monkeypatch, init_calls):
    _report_cuda(monkeypatch, True)
    assert _backend_from_flags(["--distributed-backend", "gloo"], init_calls) == "gloo"


def test_cpu_default_is_gloo(monkeypatch, init_calls):
    _report_cuda(monkeypatch, False)
    assert _backend_from_flags([], init_calls) == "gloo"


def test_nccl_without_cuda_is_refused_before_any_group(monkeypatch, init_calls):
    _report_cuda(monkeypatch, False)
    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(ValueError, match="--distributed-backend nccl needs CUDA GPUs"):
        initialize_distributed(ParallelConfig(distributed_backend="nccl"), env)
    assert init_calls == []


def test_backend_choice_table():
    assert process_group_backend(None, cuda=True) == distributed.CUDA_BACKEND
    assert process_group_backend("nccl", cuda=True) == distributed.CUDA_BACKEND
    assert process_group_backend("gloo", cuda=True) == "gloo"
    assert process_group_backend(None, cuda=False) == "gloo"
    assert process_group_backend("gloo", cuda=False) == "gloo"
