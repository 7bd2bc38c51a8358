"""The memory pre-flight takes one decision on every rank: the largest estimate against the smallest
limit (a rank that refused alone would leave the others waiting in the model's first collective)."""

from __future__ import annotations

import pytest

from megatron_amopo.testing.multirank import run_multirank

pytestmark = pytest.mark.distributed


def _body():
    import os

    import torch.distributed as dist

    from megatron_amopo.config import run_arg_parser, run_config_from_args
    from megatron_amopo.model import memory
    from megatron_amopo.testing.tiny import tiny_arch
    from megatron_amopo.training import preflight

    rank = dist.get_rank()
    cfg = run_config_from_args(run_arg_parser().parse_args(["--train-iters", "1", "--micro-batch-size", "1"]))
    est = preflight.estimate(tiny_arch(), cfg, 1, 3, training=True, device="cpu")
    # Rank 1 alone has too little memory: both ranks must refuse.
    os.environ[preflight.LIMIT_ENV] = str(100.0 if rank == 0 else est.total / memory.GiB / 2)
    try:
        preflight.check_memory(tiny_arch(), cfg, training=True)
    except preflight.InsufficientMemory as err:
        refused = str(err)
    else:
        refused = ""
    return preflight._worst_over_ranks(10 + rank, 100 - rank, "cpu"), refused


def test_every_rank_takes_the_same_decision():
    results = run_multirank(_body, 2, timeout=120)
    assert [r[0] for r in results] == [(11, 99), (11, 99)]
    assert all("will not fit" in r[1] for r in results)
