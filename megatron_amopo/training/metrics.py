"""Reducing step reports over ranks, and writing them: console, JSONL, TensorBoard."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_amopo.objective.amopo import summarize_metrics


def reduce_reports(reports: list[dict], is_reporting_rank: bool, num_pairs: int, num_rows: int) -> dict:
    """Sum the schedule's per-micro-batch reports over micro-batches and all ranks.

    Only last-stage ranks have reports, and all TP ranks of a stage hold the same
    values; ``is_reporting_rank`` (last stage, TP rank 0, CP rank 0) picks one copy per
    DP replica, everyone else contributes zeros, so one SUM all-reduce over the world
    gives every rank the global sums.
    """
    flat = torch.zeros(2 + num_rows * num_pairs + num_pairs, dtype=torch.float64)
    if is_reporting_rank and reports:
        flat[0] = sum(float(r["loss_sum"]) for r in reports)
        flat[1] = sum(float(r["count"]) for r in reports)
        flat[2 : 2 + num_rows * num_pairs] = sum(r["pair_sums"].double().cpu() for r in reports).flatten()
        flat[2 + num_rows * num_pairs :] = sum(r["pair_counts"].double().cpu() for r in reports)
    if dist.is_initialized():
        dist.all_reduce(flat)
    pair_sums = flat[2 : 2 + num_rows * num_pairs].view(num_rows, num_pairs)
    return {
        "loss_sum": flat[0].item(),
        "count": flat[1].item(),
        "loss": flat[0].item() / max(flat[1].item(), 1.0),
        "pair_sums": pair_sums,
        "pair_counts": flat[2 + num_rows * num_pairs :],
    }


def summarize(reduced: dict, pair_names: list[str], prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}loss": reduced["loss"], f"{prefix}samples": reduced["count"]}
    for k, v in summarize_metrics(reduced["pair_sums"], reduced["pair_counts"], pair_names).items():
        out[prefix + k] = float(v)
    return out


class MetricsWriter:
    """Rank-0 writer of ``metrics.jsonl`` and TensorBoard events in the run directory."""

    def __init__(self, run_dir: Optional[str], enabled: bool) -> None:
        self.enabled = enabled and run_dir is not None
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboard is a declared dependency; keep logging JSONL regardless
            self._tb = None

    def write(self, iteration: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "iteration": iteration, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, iteration)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_line(it: int, total: int, values: dict[str, float], pair_names: list[str]) -> str:
    """One console line: progress, lr, loss, per-dimension weight/margin/accuracy, speed, ETA."""
    eta = values.get("eta_s", 0.0)
    parts = [
        f"iter {it}/{total}", f"samples {int(values.get('consumed_samples', 0))}", f"lr {values.get('lr', 0):.3g}",
        f"loss {values['loss']:.4f}", f"grad_norm {values.get('grad_norm', float('nan')):.3g}",
    ]
    for name in pair_names:
        if f"weight/{name}" in values:
            parts.append(
                f"{name}[w {values[f'weight/{name}']:.3f}±{values.get(f'weight_std/{name}', 0):.3f} "
                f"m {values.get(f'margin/{name}', 0):.3f} acc {values.get(f'accuracy/{name}', 0):.2f}]"
            )
    parts += [f"{values.get('samples_per_s', 0):.2f} samples/s", f"{values.get('tokens_per_s', 0):.0f} tok/s",
              f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
    return " | ".join(parts)
