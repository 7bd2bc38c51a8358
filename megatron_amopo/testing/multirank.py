"""Run a function on N real gloo ranks in spawned processes and collect the results.

Used by the multi-rank test tier: ``results = run_multirank(fn, 4, arg)`` returns
``[fn(arg) on rank 0, ..., on rank 3]``. Every rank gets torchrun's environment
variables and an initialised gloo default group; ``fn`` then sets up Megatron's
parallel groups itself. Failures of any rank are reported with every failing
rank's traceback; a run that does not finish within ``timeout`` seconds (some
Megatron failure modes hang) kills all ranks and says which had not finished.
Spawning costs ~3 s per rank on 2 cores, so run many checks per call.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

from megatron_amopo.runtime.comm import free_port

# A rank that failed leaves its peers blocked in collectives; give them this long
# to fail on their own before they are killed.
_GRACE_AFTER_FAILURE_S = 5.0


class MultiRankError(RuntimeError):
    """One or more ranks failed or timed out."""


def _worker(fn, rank, world_size, port, out_q, args, kwargs, env) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        from megatron_amopo.runtime import quiet

        # Megatron-Core warns once per process about missing TE/Apex; on 4 ranks that
        # buries the real failure. The entry points' filter: unknown warnings still print.
        quiet.install()
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        result = fn(*args, **kwargs)
        out_q.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report everything, including SystemExit from inside fn
        out_q.put((rank, "error", traceback.format_exc()))
    finally:
        _shutdown_checkpoint_writer()
        try:
            from megatron_amopo.runtime.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def _shutdown_checkpoint_writer() -> None:
    """dist_checkpointing starts a multiprocessing manager per rank for its writer
    results; left running, it outlives the rank and keeps the parent's pipes open."""
    import sys

    module = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    queue_proxy = getattr(module, "_results_queue", None) if module else None
    manager = getattr(queue_proxy, "_manager", None)
    if manager is not None:
        manager.shutdown()


def run_multirank(
    fn: Callable[..., Any], world_size: int, *args, timeout: float = 240.0, env: dict | None = None, **kwargs
) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return per-rank results."""
    if not 1 <= world_size <= 4:
        raise ValueError(f"world_size must be 1..4 on this project's CI machines, got {world_size}")
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    # Not daemonic: dist_checkpointing starts a multiprocessing manager in each rank.
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, out_q, args, kwargs, dict(env or {})))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        now = time.monotonic()
        if errors:
            deadline = min(deadline, now + _GRACE_AFTER_FAILURE_S)
        try:
            rank, status, payload = out_q.get(timeout=max(0.05, min(1.0, deadline - now)))
        except queue.Empty:
            if time.monotonic() >= deadline or not any(p.is_alive() for p in procs):
                break
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    for p in procs:
        p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join()
    missing = sorted(set(range(world_size)) - set(results) - set(errors))
    if errors or missing:
        parts = [f"--- rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())]
        if missing:
            why = "timed out" if time.monotonic() >= deadline else "died without reporting"
            parts.append(f"--- ranks {missing} {why} (timeout {timeout:.0f} s)")
        raise MultiRankError(f"{fn.__name__} on {world_size} ranks failed\n" + "\n".join(parts))
    return [results[r] for r in range(world_size)]
