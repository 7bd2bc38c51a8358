"""Reducing step reports over ranks, and writing them: console, JSONL, TensorBoard."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass
from typing import IO, Any, Optional

import torch
import torch.distributed as dist

from megatron_amopo.objective.amopo import summarize_metrics
from megatron_amopo.training.step import StepReport


@dataclass
class StepTotals:
    """A step's (or an evaluation's) reports summed over micro-batches and ranks (``reduce_reports``)."""

    loss_sum: float
    count: float  # valid samples
    pair_sums: torch.Tensor  # float64 [E, P]
    pair_counts: torch.Tensor  # float64 [P]
    groups: float = 0.0  # groups (samples) processed, valid or not
    tokens: float = 0.0  # real positions processed
    flops: float = 0.0  # model FLOPs of those positions (training)
    stop: float = 0.0  # > 0 when some rank asked to stop (SIGTERM / SIGUSR1)
    grad_norm: float = float("nan")  # set after the optimizer step

    @property
    def loss(self) -> float:
        """Mean loss over the valid samples."""
        return self.loss_sum / max(self.count, 1.0)


@dataclass
class HostCounts:
    """This rank's host-side values of a step, summed over all ranks by ``reduce_reports``."""

    groups: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    stop: float = 0.0


def reduce_reports(
    reports: Sequence[StepReport],
    is_reporting_rank: bool,
    num_pairs: int,
    num_rows: int,
    host: Optional[HostCounts] = None,
) -> StepTotals:
    """Sum the schedule's per-micro-batch reports over micro-batches and all ranks, together
    with this rank's ``host`` counts, in one all-reduce.

    Only last-stage ranks have reports, and all TP ranks of a stage hold the same
    values; ``is_reporting_rank`` (last stage, TP rank 0, CP rank 0) picks one copy per
    DP replica, everyone else contributes zeros. The reports are summed on their device
    in float64, in order, and copied to the host once (one device sync per call); the
    all-reduce then runs on CPU tensors (gloo, or the gloo side of ``cpu:gloo,cuda:nccl``).
    """
    host_values = astuple(host or HostCounts())
    n = 2 + num_rows * num_pairs + num_pairs
    flat = torch.zeros(n + len(host_values), dtype=torch.float64)
    if is_reporting_rank and reports:
        total = sum(r.sums() for r in reports)
        assert isinstance(total, torch.Tensor)
        flat[:n] = total.cpu()
    flat[n:] = torch.tensor(host_values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(flat)
    loss_sum, count = flat[:2].tolist()
    return StepTotals(
        loss_sum,
        count,
        pair_sums=flat[2 : 2 + num_rows * num_pairs].view(num_rows, num_pairs),
        pair_counts=flat[2 + num_rows * num_pairs : n],
        **asdict(HostCounts(*flat[n:].tolist())),
    )


def summarize(totals: StepTotals, pair_names: list[str], prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}loss": totals.loss, f"{prefix}samples": totals.count}
    for k, v in summarize_metrics(totals.pair_sums, totals.pair_counts, pair_names).items():
        out[prefix + k] = float(v)
    return out


def open_wandb(project: str, name: str, save_dir: str, run_id: str, config: dict) -> Any:
    """Start the W&B run ``run_id``, or continue it when a resumed run logged to it before.

    Online or offline (``WANDB_MODE=offline``) is W&B's own environment setting."""
    import wandb

    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=project, name=name, dir=save_dir, id=run_id, resume="allow", config=config)


class MetricsWriter:
    """Rank-0 writer of ``metrics.jsonl`` and TensorBoard events in the run directory, and of the
    same scalars (``train/loss``, ``valid/accuracy/general``, ...) to a W&B run when one is given."""

    def __init__(self, run_dir: Optional[str], enabled: bool, wandb_run: Any = None) -> None:
        self.enabled = enabled and run_dir is not None
        self._jsonl: Optional[IO[str]] = None
        self._tb = None
        self._wandb = wandb_run if self.enabled else None
        if run_dir is None or not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboard is a declared dependency; keep logging JSONL regardless
            self._tb = None

    def write(self, iteration: int, values: dict[str, float], kind: str = "train") -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"kind": kind, "iteration": iteration, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._tb = self._wandb = None


def format_line(it: int, total: int, values: dict[str, float], pair_names: list[str]) -> str:
    """One console line: progress, lr, loss, per-dimension weight/margin/accuracy, speed (MFU when
    known), peak memory (GPU: ``mem``, max allocated; CPU: ``rss``, peak resident set), ETA."""
    eta = values.get("eta_s", 0.0)
    parts = [
        f"iter {it}/{total}",
        f"samples {int(values.get('consumed_samples', 0))}",
        f"lr {values.get('lr', 0):.3g}",
        f"loss {values['loss']:.4f}",
        f"grad_norm {values.get('grad_norm', float('nan')):.3g}",
    ]
    for name in pair_names:
        if f"weight/{name}" in values:
            parts.append(
                f"{name}[w {values[f'weight/{name}']:.3f}±{values.get(f'weight_std/{name}', 0):.3f} "
                f"m {values.get(f'margin/{name}', 0):.3f} acc {values.get(f'accuracy/{name}', 0):.2f}]"
            )
    parts += [f"{values.get('samples_per_s', 0):.2f} samples/s", f"{values.get('tokens_per_s', 0):.0f} tok/s"]
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    if "max_allocated_gib" in values:
        parts.append(f"mem {values['max_allocated_gib']:.2f} GiB")
    elif "peak_rss_gib" in values:
        parts.append(f"rss {values['peak_rss_gib']:.2f} GiB")
    parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    return " | ".join(parts)
