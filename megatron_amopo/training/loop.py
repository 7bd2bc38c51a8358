"""The training run: model, optimizer, data plans, the step loop, evaluation, saving.

Composes megatron.core parts: ``get_forward_backward_func`` schedules (1F1B with
PP), Megatron DDP, ``get_megatron_optimizer`` (optionally distributed),
``OptimizerParamScheduler`` and ``dist_checkpointing``. Library code: it takes a
``RunConfig`` and a forward-step function, never reads argv.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist

from megatron_amopo.checkpoint.store import METADATA_FILE, read_model_metadata, write_model_metadata
from megatron_amopo.config import RunConfig
from megatron_amopo.data.batch import MicroBatch
from megatron_amopo.evaluation.report import gather_per_group
from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.model.build import build_model, check_wiring
from megatron_amopo.model.provider import transformer_config
from megatron_amopo.objective.amopo import PAIR_METRIC_NAMES
from megatron_amopo.runtime.comm import is_rank0
from megatron_amopo.runtime.progress import progress
from megatron_amopo.training import batches as tdata
from megatron_amopo.training import checkpointing as ckpt
from megatron_amopo.training import disk
from megatron_amopo.training.metrics import MetricsWriter, format_line, open_wandb, reduce_reports, summarize
from megatron_amopo.training.optimizer import build_optimizer, build_scheduler
from megatron_amopo.training.preflight import check_memory
from megatron_amopo.training.profiling import StepProfiler
from megatron_amopo.training.step import packed_thd_default, seq_pad_multiple
from megatron_amopo.training.throughput import device_peak_tflops, mfu, peak_memory_bytes, training_flops


class StopRequested:
    """SIGTERM / SIGUSR1 (SLURM preemption) ask for a checkpoint and a clean exit.

    Ranks may get the signal at different times: ``flag`` travels in the step's
    all-reduce (``reduce_step``), so every rank stops after the same step.
    """

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self) -> bool:
        """Whether any rank has the flag: one small all-reduce (CPU tensor, like ``reduce_step``'s)."""
        flag = torch.tensor([float(self.flag)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(flag)
        return flag.item() > 0


def log0(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def run_transformer_config(arch, cfg: RunConfig):
    """TransformerConfig of a training or evaluation run at ``cfg.parallel``."""
    tc = cfg.training
    config = transformer_config(
        arch,
        cfg.parallel,
        params_dtype=torch.bfloat16 if tc.bf16 else torch.float32,
        recompute_granularity=tc.recompute_granularity,
        calculate_per_token_loss=True,
    )
    # Micro-batches differ in rows and length, so pipeline stages exchange shapes. Set
    # after construction: TransformerConfig's validation rejects the flag for its MoE
    # token dispatcher even in dense models.
    config.variable_seq_lengths = cfg.parallel.pipeline_model_parallel_size > 1
    return config


def is_reporting_rank() -> bool:
    """One rank per DP replica reports step values: last stage, TP rank 0, CP rank 0."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    )


def run_schedule(model: list, forward_step: Callable, batches: list[MicroBatch], forward_only: bool) -> list[dict]:
    """Megatron's schedule (1F1B with PP) over this rank's micro-batches of one step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=max(b.tokens.shape[0] for b in batches),
        forward_only=forward_only,
    )


def reduce_step(
    reports: list[dict],
    batches: list[MicroBatch],
    num_pairs: int,
    stop: bool = False,
    arch: Optional[ModelArch] = None,
) -> dict:
    """Global sums of a step's reports, the groups, real tokens and (given ``arch``) model FLOPs
    it processed, and ``stop`` (> 0 when any rank asks to stop): one all-reduce per step."""
    reporting = is_reporting_rank()
    host = {"groups": 0.0, "tokens": 0.0, "flops": 0.0, "stop": float(stop)}
    if reporting:
        lengths = [n for b in batches for n in b.seq_lengths]  # positions per sequence
        host.update(
            groups=sum(len(b.sample_ids) for b in batches),
            tokens=sum(lengths),
            flops=training_flops(arch, lengths) if arch is not None else 0.0,
        )
    return reduce_reports(reports, reporting, num_pairs, len(PAIR_METRIC_NAMES), host)


def speed_values(reduced: dict, seconds: float, peak_tflops: Optional[float]) -> dict[str, float]:
    """Throughput of one step from ``reduce_step``'s sums: samples/s, tokens/s, model TFLOP/s per
    rank, MFU (only with a peak: bf16 on a GPU in ``throughput.PEAK_TFLOPS``) and this rank's peak
    memory (GPU: max allocated, CPU: peak RSS)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = dict(
        samples_per_s=reduced["groups"] / seconds,
        tokens_per_s=reduced["tokens"] / seconds,
        tflops_per_rank=reduced["flops"] / seconds / world / 1e12,
    )
    utilisation = mfu(reduced["flops"], seconds, world, peak_tflops)
    if utilisation is not None:
        out["mfu"] = utilisation
    out["max_allocated_gib" if torch.cuda.is_available() else "peak_rss_gib"] = peak_memory_bytes() / 2**30
    return out


@torch.no_grad()
def evaluate_split(
    model: list,
    forward_step: Callable,
    split,
    plan,
    train_cfg,
    pair_names: list[str],
    max_batches: Optional[int] = None,
    per_group: bool = False,
    thd: bool = False,
    pad_to_multiple: int = 1,
) -> dict:
    """Loss, per-pair preference accuracy and margins on a split (forward only, all DP ranks).

    ``per_group``: also return every group's pair margins under ``"per_group"`` (on all ranks).
    ``thd``, ``pad_to_multiple``: the form of packed micro-batches (``tdata.microbatches``)."""
    stop = plan.num_microbatches if max_batches is None else min(max_batches, plan.num_microbatches)
    stop = stop if train_cfg.eval_batches is None else min(stop, train_cfg.eval_batches)
    for chunk in model:
        chunk.eval()
    bar = progress(total=stop, desc="evaluate", unit=" micro-batches")

    def counted_step(*args, **kwargs):  # one call per micro-batch on this rank's stage
        out = forward_step(*args, **kwargs)
        bar.update()
        return out

    try:
        batches = list(tdata.microbatches(split, plan, train_cfg, 0, stop, thd=thd, pad_to_multiple=pad_to_multiple))
        # A DP rank may have no micro-batch in a pass over every group (tdata.make_eval_plan).
        reports = run_schedule(model, counted_step, batches, forward_only=True) if batches else []
        reduced = reduce_step(reports, batches, len(pair_names))
    finally:
        bar.close()
        for chunk in model:
            chunk.train()
    values: dict = summarize(reduced, pair_names)
    if per_group:
        values["per_group"] = gather_per_group(reports, split.dataset.row_ids_G, pair_names, is_reporting_rank())
    return values


def format_eval(values: dict[str, float], pair_names: list[str], label: str) -> str:
    acc = " ".join(f"{n} {values.get(f'accuracy/{n}', float('nan')):.3f}" for n in pair_names)
    return (
        f"[{label}] loss {values['loss']:.4f} | accuracy: {acc} | accuracy/all "
        f"{values.get('accuracy/all', float('nan')):.3f} | margin/all {values.get('margin/all', float('nan')):.3f}"
    )


class Trainer:
    """One AMoPO training run on this rank."""

    def __init__(self, cfg: RunConfig, forward_step: Callable) -> None:
        from megatron.core import parallel_state as ps

        self.cfg, self.ps = cfg, ps
        if not cfg.checkpoint.load:
            raise ValueError(
                "--load is required: a converted Hugging Face model (tools/convert_hf_to_megatron.py) "
                "or a training run's checkpoint directory"
            )
        self.model_meta = read_model_metadata(cfg.checkpoint.load)
        self.arch = self.model_meta.arch
        if self.arch.sliding_window and cfg.training.seq_length > self.arch.sliding_window:
            raise ValueError(
                f"--seq-length {cfg.training.seq_length} is longer than this model's sliding attention window "
                f"({self.arch.sliding_window}); full causal attention would differ from the model's: use "
                f"--seq-length <= {self.arch.sliding_window}"
            )
        tc = cfg.training
        self.run_dir = cfg.data.run_dir or cfg.checkpoint.save or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        self.profiler = StepProfiler(cfg.profile, self.run_dir, dist.get_rank(), dist.get_world_size())
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.config = run_transformer_config(self.arch, cfg)
        # Packed micro-batches as THD streams or as masked rows: the plan charges what the step feeds.
        self.thd = packed_thd_default(self.config)
        self.pad_to_multiple = seq_pad_multiple(self.config)
        self._open_data()
        check_memory(self.arch, cfg, self.train_split, self.plan)  # refuses a run that will not fit
        if cfg.checkpoint.save:
            disk.clean_stale_staging(cfg.checkpoint.save)  # before the check: what they held is free again
            disk.check_disk(self.arch, cfg.checkpoint.save, tc.bf16, refuse=cfg.checkpoint.disk_check)
        self.model = build_model(self.arch, self.config, use_distributed_optimizer=tc.use_distributed_optimizer)
        check_wiring(self.config)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, tc)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, self.train_iters, tc.global_batch_size)
        self.state, _ = ckpt.load_checkpoint(
            cfg.checkpoint.load, self.model, self.optimizer, self.scheduler, finetune=cfg.checkpoint.finetune
        )
        if cfg.checkpoint.save:
            self._prepare_save_dir(cfg.checkpoint.save)
        self.forward_step = functools.partial(
            forward_step,
            objective_cfg=cfg.amopo,
            tp_group=ps.get_tensor_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(),
        )
        self.writer = MetricsWriter(self.run_dir, enabled=is_rank0(), wandb_run=self._open_wandb())
        self.stop = StopRequested()

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
        meta = self.model_meta
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

    # ----------------------------------------------------------------- data
    def _open_data(self) -> None:
        tc = self.cfg.training
        vocab_hash = self._tokenizer_vocab_hash()
        self.train_split, self.valid_split = tdata.open_splits(self.cfg.data, tc.seed, vocab_hash, tc.seq_length)
        self.pair_names = self.train_split.dataset.pair_names
        one_epoch = tdata.make_plan(
            self.train_split, tc, num_epochs=1, seed=tc.seed, dp_rank=self.dp_rank, dp_size=self.dp_size, thd=self.thd
        )
        if one_epoch.num_microbatches == 0:
            raise ValueError(
                f"--data-path has {len(self.train_split)} training groups: not enough for one "
                f"micro-batch on each of {self.dp_size} data-parallel ranks"
            )
        self.num_microbatches = tc.microbatches_per_step(self.dp_size, tdata.mean_groups_per_microbatch(one_epoch))
        steps_per_epoch = one_epoch.num_microbatches // self.num_microbatches
        if steps_per_epoch == 0:
            raise ValueError(
                f"one epoch gives {one_epoch.num_microbatches} micro-batches per DP rank, fewer than "
                f"the {self.num_microbatches} one step needs; lower --global-batch-size"
            )
        self.train_iters = tc.train_iters or (tc.train_epochs or 1) * steps_per_epoch
        epochs = math.ceil(self.train_iters / steps_per_epoch)
        self.plan = tdata.make_plan(
            self.train_split,
            tc,
            num_epochs=epochs,
            seed=tc.seed,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            thd=self.thd,
        )
        self.valid_plan = None
        if self.valid_split is not None and len(self.valid_split):
            self.valid_plan = tdata.make_eval_plan(
                self.valid_split,
                tc,
                seed=tc.seed + 1,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
                thd=self.thd,
            )

    def _tokenizer_vocab_hash(self) -> Optional[str]:
        """Vocab hash of the tokenizer stored with the model (checked against the datasets)."""
        from megatron_amopo.data.tokenization import load_tokenizer, tokenizer_fingerprint

        path = self.model_meta.tokenizer_dir
        if not path:
            log0("warning: the checkpoint has no tokenizer; datasets are not checked against the model's tokenizer")
            return None
        return tokenizer_fingerprint(load_tokenizer(path), path)["vocab_hash"]

    # ----------------------------------------------------------------- steps
    def _reduce(self, reports: list[dict], batches: list[MicroBatch]) -> dict:
        return reduce_step(reports, batches, len(self.pair_names), stop=self.stop.flag, arch=self.arch)

    def _check_finite(self, reduced: dict, reports: list[dict]) -> None:
        if math.isfinite(reduced["loss"]):
            return
        ids = [int(i) for r in reports for i in r["sample_ids"]] if is_reporting_rank() else []
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, ids)
        all_ids = sorted({i for part in everyone for i in part})
        raise FloatingPointError(
            f"loss is {reduced['loss']} at iteration {self.state.iteration + 1} (sample ids of the batch: {all_ids}); "
            "stopped before the optimizer step, nothing new saved. Lower --lr or inspect those samples."
        )

    def train_step(self) -> dict:
        tc = self.cfg.training
        start = self.state.consumed_microbatches
        batches = list(
            tdata.microbatches(
                self.train_split,
                self.plan,
                tc,
                start,
                start + self.num_microbatches,
                thd=self.thd,
                pad_to_multiple=self.pad_to_multiple,
            )
        )
        if len(batches) < self.num_microbatches:
            raise RuntimeError(f"the data plan ran out at micro-batch {start} (plan has {self.plan.num_microbatches})")
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = run_schedule(self.model, self.forward_step, batches, forward_only=False)
        reduced = self._reduce(reports, batches)
        if tc.exit_on_nan:
            self._check_finite(reduced, reports)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=tc.global_batch_size)
        self.state.iteration += 1
        self.state.consumed_microbatches += self.num_microbatches
        self.state.consumed_samples += int(reduced["groups"])
        reduced["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return reduced

    def evaluate(self) -> Optional[dict[str, float]]:
        if self.valid_plan is None or self.valid_split is None:
            return None
        log0(f"evaluating {len(self.valid_split)} validation groups at iter {self.state.iteration}")
        values = evaluate_split(
            self.model,
            self.forward_step,
            self.valid_split,
            self.valid_plan,
            self.cfg.training,
            self.pair_names,
            thd=self.thd,
            pad_to_multiple=self.pad_to_multiple,
        )
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
                self.model,
                self.optimizer,
                self.scheduler,
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
        log0(
            f"training {self.train_iters} steps x {self.num_microbatches} micro-batches x DP {self.dp_size} "
            f"({len(self.train_split)} groups, P={len(self.pair_names)} pairs, layout {tc.batch_layout}); "
            f"starting at step {self.state.iteration}"
        )
        try:
            return self._train_loop()
        finally:
            self.profiler.close()
            self.writer.close()

    def _train_loop(self) -> dict:
        tc, ck = self.cfg.training, self.cfg.checkpoint
        history: dict = {"train": [], "valid": []}
        if tc.eval_interval and self.state.iteration == 0:
            history["valid"].append(self.evaluate())
        peak = device_peak_tflops()[1] if tc.bf16 else None  # MFU against the dense bf16 peak only
        t0, it0 = time.time(), self.state.iteration
        last_saved = self.state.iteration
        while self.state.iteration < self.train_iters:
            tick = time.time()
            with self.profiler.step(self.state.iteration + 1):
                reduced = self.train_step()
            it = self.state.iteration
            values = summarize(reduced, self.pair_names)
            values.update(
                lr=self.optimizer.param_groups[0]["lr"],
                grad_norm=reduced["grad_norm"],
                consumed_samples=self.state.consumed_samples,
                **speed_values(reduced, time.time() - tick, peak),
                tokens=reduced["tokens"],
                eta_s=(time.time() - t0) / (it - it0) * (self.train_iters - it),
            )
            history["train"].append(values)
            self.writer.write(it, values)
            if it % tc.log_interval == 0 or it == self.train_iters:
                log0(format_line(it, self.train_iters, values, self.pair_names))
            paused = False  # an evaluation or a save ran after the step's all-reduce
            if tc.eval_interval and it % tc.eval_interval == 0 and it != self.train_iters:
                history["valid"].append(self.evaluate())
                paused = True
            if ck.save_interval and it % ck.save_interval == 0:
                self.save()
                last_saved = it
                paused = True
            if tc.exit_interval and it % tc.exit_interval == 0 and it != self.train_iters:
                log0(f"--exit-interval {tc.exit_interval}: saving at iteration {it} and exiting")
                if last_saved != it:
                    self.save()
                return history
            # Some rank got SIGTERM / SIGUSR1 before the step's all-reduce, or during the evaluation or
            # save after it (asked again then, so a signal then does not wait for another whole step).
            if reduced["stop"] > 0 or (paused and self.stop.agreed()):
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
            train_iters=self.train_iters,
            microbatches_per_step=self.num_microbatches,
            data_parallel_size=self.dp_size,
            architecture=asdict(self.arch),
        )
        return out
