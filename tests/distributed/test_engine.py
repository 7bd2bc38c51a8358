"""The run set-up and the engine on 2 real gloo ranks (DP2), in-process: a tiny Qwen2 converted by the
real tool, real HelpSteer2 rows preprocessed by the real tool (the session's ``tiny_run``).

- ``setup_run`` + ``Trainer`` install no signal handler (the entry point does), and a run that returns
  early (``--exit-interval``) closes its metrics files.
- Micro-batches built by DataLoader workers train exactly like those built on the main thread.
- ``Engine.evaluate`` (forward only) gives the training step's own loss on the same micro-batches.
"""

from __future__ import annotations

import json
import signal

import pytest

from megatron_amopo.testing import run_multirank
from megatron_amopo.testing.pipeline import TINY_SEQ

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]
SEQ = TINY_SEQ


@pytest.fixture(scope="module")
def setup(tiny_run):
    return tiny_run


def _cfg(root, run_dir, workers: int, **training):
    from megatron_amopo.config import RunConfig, run_arg_parser, run_config_from_args

    flags = ["--load", str(root / "init"), "--data-path", str(root / "data"), "--run-dir", str(run_dir)]
    flags += ["--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", str(SEQ), "--lr", "1e-3"]
    flags += ["--lr-warmup-fraction", "0", "--num-workers", str(workers)]
    for k, v in training.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    cfg: RunConfig = run_config_from_args(run_arg_parser().parse_args(flags))
    return cfg


def _body(root: str, out: str):
    from pathlib import Path

    import torch.distributed as dist

    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.training.loop import Trainer
    from megatron_amopo.training.run import setup_run

    initialize_distributed(ParallelConfig())
    root_p, results = Path(root), {}
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    for workers in (0, 1):
        set_seed(1234)
        run = setup_run(_cfg(root_p, Path(out) / f"w{workers}", workers, train_iters=2, exit_interval=1), training=True)
        trainer = Trainer(run)
        history = trainer.train()  # returns after step 1 of 2 (--exit-interval 1)
        results[workers] = [v["loss"] for v in history["train"]]
        results[f"closed{workers}"] = trainer.writer._jsonl is None or trainer.writer._jsonl.closed
        if workers == 0:
            # the first step's micro-batches, forward only: the loss the step reported before its update
            fresh = setup_run(_cfg(root_p, Path(out) / "eval", 0, train_iters=2), training=True)
            batches = list(fresh.microbatches(fresh.split, fresh.plan, 0, fresh.microbatches_per_step))
            totals, _ = fresh.engine.evaluate(batches, len(fresh.pair_names))
            results["eval"] = totals.loss
    results["handlers_unchanged"] = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    results["rank"] = dist.get_rank()
    return results


def test_run_setup_engine_and_workers(setup, tmp_path):
    results = run_multirank(_body, 2, str(setup), str(tmp_path), timeout=600)
    for r in results:
        assert r["handlers_unchanged"], "setup_run / Trainer installed a signal handler"
        assert r["closed0"] and r["closed1"], "an early return left metrics.jsonl open"
        assert len(r[0]) == len(r[1]) == 1  # --exit-interval 1 returned after one step
        assert r[0] == r[1], "DataLoader workers changed the training step"
        assert abs(r["eval"] - r[0][0]) <= 1e-6 * abs(r[0][0]), (r["eval"], r[0][0])
    lines = (tmp_path / "w1" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines if json.loads(x)["kind"] == "train"] == [1]
