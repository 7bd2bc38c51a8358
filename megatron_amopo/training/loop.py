"""The training loop over a built ``Run`` (``training.run.setup_run``): steps through the run's
engine, evaluation, logging, saving, preemption.

Composes megatron.core parts through the engine (schedules, DDP, the optimizer and
``OptimizerParamScheduler``) and ``dist_checkpointing``. Library code: it takes a ``Run``,
never reads argv and installs no signal handler (``StopRequested.install``, by the entry point).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist

from megatron_amopo.checkpoint.store import METADATA_FILE, read_model_metadata, write_model_metadata
from megatron_amopo.data.batch import MicroBatch
from megatron_amopo.data.planner import MicrobatchPlan
from megatron_amopo.evaluation.report import gather_per_group
from megatron_amopo.runtime.comm import is_rank0, log0
from megatron_amopo.runtime.progress import progress
from megatron_amopo.training import batches as tdata
from megatron_amopo.training import checkpointing as ckpt
from megatron_amopo.training import disk
from megatron_amopo.training.engine import is_reporting_rank
from megatron_amopo.training.metrics import MetricsWriter, StepTotals, format_line, open_wandb, summarize
from megatron_amopo.training.profiling import StepProfiler
from megatron_amopo.training.run import Run
from megatron_amopo.training.step import StepReport
from megatron_amopo.training.throughput import device_peak_tflops, mfu, peak_memory_bytes


class StopRequested:
    """SIGTERM / SIGUSR1 (SLURM preemption) ask for a checkpoint and a clean exit.

    Ranks may get the signal at different times: ``flag`` travels in the step's
    all-reduce (``Engine.reduce``), so every rank stops after the same step. A run's entry point
    installs the handlers (``install``); a Trainer built without it only stops when asked in code.
    """

    def __init__(self) -> None:
        self.flag = False

    @classmethod
    def install(cls) -> StopRequested:
        """A StopRequested whose flag SIGTERM and SIGUSR1 set (call in the main thread)."""
        stop = cls()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, stop._handle)
        return stop

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self) -> bool:
        """Whether any rank has the flag: one small all-reduce (CPU tensor, like ``reduce_step``'s)."""
        flag = torch.tensor([float(self.flag)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0


def speed_values(totals: StepTotals, seconds: float, peak_tflops: Optional[float]) -> dict[str, float]:
    """Throughput of one step from ``Engine.reduce``'s sums: samples/s, tokens/s, model TFLOP/s per
    rank, MFU (only with a peak: bf16 on a GPU in ``throughput.PEAK_TFLOPS``) and this rank's peak
    memory (GPU: max allocated, CPU: peak RSS)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = dict(
        samples_per_s=totals.groups / seconds,
        tokens_per_s=totals.tokens / seconds,
        tflops_per_rank=totals.flops / seconds / world / 1e12,
    )
    utilisation = mfu(totals.flops, seconds, world, peak_tflops)
    if utilisation is not None:
        out["mfu"] = utilisation
    out["max_allocated_gib" if torch.cuda.is_available() else "peak_rss_gib"] = peak_memory_bytes() / 2**30
    return out


def evaluate_split(run: Run, split: tdata.Split, plan: MicrobatchPlan, per_group: bool = False) -> dict:
    """Loss, per-pair preference accuracy and margins on a split (forward only, all DP ranks), at
    most ``--eval-batches`` micro-batches per rank. ``per_group``: also every group's pair margins
    under ``"per_group"`` (on all ranks)."""
    stop = plan.num_microbatches
    if run.cfg.training.eval_batches is not None:
        stop = min(stop, run.cfg.training.eval_batches)
    bar = progress(total=stop, desc="evaluate", unit=" micro-batches")
    try:
        # A DP rank may have no micro-batch in a pass over every group (tdata.make_eval_plan).
        totals, reports = run.engine.evaluate(run.microbatches(split, plan, 0, stop), len(run.pair_names), bar.update)
    finally:
        bar.close()
    values: dict = summarize(totals, run.pair_names)
    if per_group:
        values["per_group"] = gather_per_group(reports, split.dataset.row_ids_G, run.pair_names, is_reporting_rank())
    return values


def format_eval(values: dict[str, float], pair_names: list[str], label: str) -> str:
    acc = " ".join(f"{n} {values.get(f'accuracy/{n}', float('nan')):.3f}" for n in pair_names)
    return (
        f"[{label}] loss {values['loss']:.4f} | accuracy: {acc} | accuracy/all "
        f"{values.get('accuracy/all', float('nan')):.3f} | margin/all {values.get('margin/all', float('nan')):.3f}"
    )


class Trainer:
    """One AMoPO training run on this rank, over a built ``Run`` (``setup_run(cfg, training=True)``).

    ``stop``: the preemption flag (``StopRequested.install()`` at the entry point); default: one
    without signal handlers."""

    def __init__(self, run: Run, stop: Optional[StopRequested] = None) -> None:
        if run.state is None:
            raise ValueError("Trainer needs a training run: setup_run(cfg, training=True)")
        self.run, self.cfg, self.state = run, run.cfg, run.state
        self.engine, self.arch, self.pair_names = run.engine, run.arch, run.pair_names
        cfg = run.cfg
        self.run_dir = cfg.data.run_dir or cfg.checkpoint.save or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if cfg.checkpoint.save:
            self._prepare_save_dir(cfg.checkpoint.save)
        self.profiler = StepProfiler(cfg.profile, self.run_dir, dist.get_rank(), dist.get_world_size())
        self.writer = MetricsWriter(self.run_dir, enabled=is_rank0(), wandb_run=self._open_wandb())
        self.stop = stop or StopRequested()
        self._batches: Optional[Iterator[MicroBatch]] = None  # the training plan from the current position

    def _open_wandb(self):
        """Rank 0's W&B run (None without --wandb-project). Its id lives in the training state, so a
        resume from a checkpoint continues the same W&B run; a fresh run draws a new id on rank 0."""
        lc = self.cfg.logging
        if lc.wandb_project is None:
            return None
        if not self.state.wandb_run_id:
            ids = [os.urandom(8).hex() if is_rank0() else ""]
            dist.broadcast_object_list(ids, src=0)  # every rank's checkpoint state holds the same id
            self.state.wandb_run_id = ids[0]
        if not is_rank0():
            return None
        name = lc.wandb_exp_name or os.path.basename(os.path.abspath(self.run_dir))
        save_dir = lc.wandb_save_dir or self.run_dir
        return open_wandb(lc.wandb_project, name, save_dir, self.state.wandb_run_id, self.resolved_config())

    def _prepare_save_dir(self, root: str) -> None:
        """--save holds amopo_model.json and the tokenizer, so it can be resumed from and exported."""
        meta = self.run.meta
        if os.path.isfile(os.path.join(root, METADATA_FILE)):
            existing = read_model_metadata(root).arch
            if existing != meta.arch:
                raise ValueError(
                    f"--save {root} already holds checkpoints of another model ({existing.model_type}, "
                    f"{existing.num_layers} layers, hidden {existing.hidden_size}) than --load "
                    f"({meta.arch.model_type}, {meta.arch.num_layers} layers, hidden {meta.arch.hidden_size}); "
                    "choose an empty --save directory"
                )
        if os.path.abspath(root) != os.path.abspath(self.cfg.checkpoint.load or ""):
            write_model_metadata(
                root,
                meta.arch,
                meta.hf_config,
                meta.tokenizer_dir,
                source={**meta.source, "trained_from": os.path.abspath(self.cfg.checkpoint.load or "")},
                generation_config=meta.generation_config,
            )
        dist.barrier()

    # ----------------------------------------------------------------- steps
    def _check_finite(self, totals: StepTotals, reports: list[StepReport]) -> None:
        if math.isfinite(totals.loss):
            return
        ids = [int(i) for r in reports for i in r.sample_ids] if is_reporting_rank() else []
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, ids)
        all_ids = sorted({i for part in everyone for i in part})
        raise FloatingPointError(
            f"loss is {totals.loss} at iteration {self.state.iteration + 1} (sample ids of the batch: {all_ids}); "
            "stopped before the optimizer step, nothing new saved. Lower --lr or inspect those samples."
        )

    def train_step(self) -> StepTotals:
        """One optimizer step over the next ``microbatches_per_step`` micro-batches of the plan."""
        n, start = self.run.microbatches_per_step, self.state.consumed_microbatches
        if self._batches is None:  # built ahead by the DataLoader workers from here on
            self._batches = self.run.microbatches(self.run.split, self.run.plan, start)
        batches = list(itertools.islice(self._batches, n))
        if len(batches) < n:
            raise RuntimeError(
                f"the data plan ran out at micro-batch {start} (plan has {self.run.plan.num_microbatches})"
            )
        reports = self.engine.forward_backward(batches)
        totals = self.engine.reduce(reports, batches, len(self.pair_names), stop=self.stop.flag, arch=self.arch)
        if self.cfg.training.exit_on_nan:
            self._check_finite(totals, reports)
        totals.grad_norm = self.engine.step(increment=self.cfg.training.global_batch_size)
        self.state.iteration += 1
        self.state.consumed_microbatches += n
        self.state.consumed_samples += int(totals.groups)
        return totals

    def evaluate(self) -> Optional[dict[str, float]]:
        run = self.run
        if run.valid_plan is None or run.valid_split is None:
            return None
        log0(f"evaluating {len(run.valid_split)} validation groups at iter {self.state.iteration}")
        values = evaluate_split(run, run.valid_split, run.valid_plan)
        self.writer.write(self.state.iteration, values, kind="valid")
        log0(format_eval(values, self.pair_names, f"valid @ iter {self.state.iteration}"))
        return values

    # ----------------------------------------------------------------- run
    def save(self) -> Optional[str]:
        if not self.cfg.checkpoint.save:
            return None
        root = self.cfg.checkpoint.save
        try:
            path = ckpt.save_checkpoint(
                root,
                self.engine.model,
                self.engine.optimizer,
                self.engine.scheduler,
                self.state,
                self.cfg.to_dict(),
                keep_last=self.cfg.checkpoint.keep_last,
                pair_names=self.pair_names,
            )
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failure = disk.save_failure(exc, self.arch, root, self.state.iteration, self.cfg.training.bf16)
            if failure is None:
                raise
            raise failure from exc
        log0(f"saved checkpoint {path}")
        return path

    def train(self) -> dict:
        tc = self.cfg.training
        run = self.run
        log0(
            f"training {run.train_iters} steps x {run.microbatches_per_step} micro-batches x DP {run.dp_size} "
            f"({len(run.split)} groups, P={len(self.pair_names)} pairs, layout {tc.batch_layout}); "
            f"starting at step {self.state.iteration}"
        )
        try:
            return self._train_loop()
        finally:
            self._batches = None  # the DataLoader workers exit
            self.profiler.close()
            self.writer.close()

    def _train_loop(self) -> dict:
        tc, ck, train_iters = self.cfg.training, self.cfg.checkpoint, self.run.train_iters
        history: dict = {"train": [], "valid": []}
        if tc.eval_interval and self.state.iteration == 0:
            history["valid"].append(self.evaluate())
        peak = device_peak_tflops()[1] if tc.bf16 else None  # MFU against the dense bf16 peak only
        t0, it0 = time.time(), self.state.iteration
        last_saved = self.state.iteration
        while self.state.iteration < train_iters:
            tick = time.time()
            with self.profiler.step(self.state.iteration + 1):
                totals = self.train_step()
            it = self.state.iteration
            values = summarize(totals, self.pair_names)
            values.update(
                lr=self.engine.optimizer.param_groups[0]["lr"],
                grad_norm=totals.grad_norm,
                consumed_samples=self.state.consumed_samples,
                **speed_values(totals, time.time() - tick, peak),
                tokens=totals.tokens,
                eta_s=(time.time() - t0) / (it - it0) * (train_iters - it),
            )
            history["train"].append(values)
            self.writer.write(it, values)
            if it % tc.log_interval == 0 or it == train_iters:
                log0(format_line(it, train_iters, values, self.pair_names))
            paused = False  # an evaluation or a save ran after the step's all-reduce
            if tc.eval_interval and it % tc.eval_interval == 0 and it != train_iters:
                history["valid"].append(self.evaluate())
                paused = True
            if ck.save_interval and it % ck.save_interval == 0:
                self.save()
                last_saved = it
                paused = True
            if tc.exit_interval and it % tc.exit_interval == 0 and it != train_iters:
                log0(f"--exit-interval {tc.exit_interval}: saving at iteration {it} and exiting")
                if last_saved != it:
                    self.save()
                return history
            # Some rank got SIGTERM / SIGUSR1 before the step's all-reduce, or during the evaluation or
            # save after it (asked again then, so a signal then does not wait for another whole step).
            if totals.stop > 0 or (paused and self.stop.agreed()):
                log0(f"stop signal received: saving at iteration {it} and exiting")
                if last_saved != it:
                    self.save()
                return history
        if tc.eval_interval:
            history["valid"].append(self.evaluate())
        if last_saved != self.state.iteration:
            self.save()
        return history

    def resolved_config(self) -> dict:
        out = self.cfg.to_dict()
        out["derived"] = dict(
            train_iters=self.run.train_iters,
            microbatches_per_step=self.run.microbatches_per_step,
            data_parallel_size=self.run.dp_size,
            architecture=asdict(self.arch),
        )
        return out
