"""Memory pre-flight: refuse a run that will not fit, before the model is built.

The per-rank peak is ``megatron_amopo.model.memory``'s memory model for this run's layout
and its largest planned micro-batch; on CPU it adds the rank's resident memory so far and
scales activations by the factor measured in docs/SCALING.md ("CPU memory calibration").
The limit is what this
rank may use: the GPU's free memory, or on CPU the cgroup limit / available RAM shared
by the node's ``LOCAL_WORLD_SIZE`` ranks. ``AMOPO_MEMORY_LIMIT_GIB`` sets the limit per
rank by hand; ``--no-memory-check`` starts a run that does not fit anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from megatron_amopo.config import RunConfig
from megatron_amopo.model import memory
from megatron_amopo.model.architectures import ModelArch, validate_layout
from megatron_amopo.runtime.comm import is_rank0
from megatron_amopo.runtime.errors import Refused

GiB = memory.GiB
LIMIT_ENV = "AMOPO_MEMORY_LIMIT_GIB"
# Measured / modelled activation bytes on CPU, the largest of docs/SCALING.md's calibration
# runs without recomputation ("CPU memory calibration"); the logits term measured as modelled.
CPU_ACTIVATION_FACTOR = 1.45


class InsufficientMemory(Refused, RuntimeError):
    """The run's estimated peak does not fit in the memory this rank may use."""


@dataclass(frozen=True)
class Estimate:
    peak: memory.StageMemory
    process: int  # resident memory not in the model (CPU: interpreter, libraries, data)
    save_host: int = 0  # host bytes a checkpoint save adds (memory.save_gather_bytes)
    device: str = "cpu"

    @property
    def at_save(self) -> int:
        """This device's bytes during a checkpoint save: the step's activations and logits are
        freed by then; on CPU the save's host buffers take their place."""
        p = self.peak
        return p.weights + p.grads + p.optimizer + self.process + (self.save_host if self.device == "cpu" else 0)

    @property
    def total(self) -> int:
        return max(self.peak.total + self.process, self.at_save)

    def describe(self) -> str:
        p = self.peak
        parts = [
            ("weights", p.weights),
            ("grads", p.grads),
            ("optimizer", p.optimizer),
            ("activations", p.activations),
            ("logits", p.logits),
            ("process", self.process),
        ]
        out = f"{self.total / GiB:.2f} GiB (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts if v) + ")"
        if self.save_host:
            where = "" if self.device == "cpu" else " of host memory"
            out += (
                f"; a checkpoint save gathers {self.save_host / GiB:.2f} GiB{where} of distributed-optimizer state"
                + (f" ({self.at_save / GiB:.2f} GiB then)" if self.device == "cpu" else "")
            )
        return out


def workload_and_layout(
    cfg: RunConfig,
    world_size: int,
    num_dimensions: int,
    rows: Optional[int] = None,
    width: Optional[int] = None,
    device: str = "cuda",
) -> tuple[memory.Workload, memory.Layout]:
    """The planner's view of a run: micro-batches of ``rows`` x ``width`` when the data plan is known."""
    tc, par = cfg.training, cfg.parallel
    dp = par.data_parallel_size(world_size)
    seqs_per_group = 2 * (num_dimensions + 1)
    mbs = tc.micro_batch_size or max(1, (tc.micro_batch_tokens or 0) // (tc.seq_length * seqs_per_group))
    per_step = mbs * dp
    gbs = -(-tc.global_batch_size // per_step) * per_step  # --micro-batch-tokens: whole micro-batches per step
    work = memory.default_workload(
        width or tc.seq_length, num_dimensions, gbs, bf16=tc.bf16, flash_attention=tc.bf16 and device == "cuda"
    )  # fused attention is 16-bit
    work = replace(work, rows=rows, device=device, fused_output=cfg.amopo.output_layer == "fused")
    layout = memory.Layout(
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        dp,
        mbs,
        par.sequence_parallel,
        tc.use_distributed_optimizer,
        tc.recompute_granularity or "none",
    )
    return work, layout


def largest_microbatch(split, plan, cfg: RunConfig, candidates: int = 64) -> tuple[int, int]:
    """(rows, width) of the planned micro-batch with the most positions (packed: the ROW RULE), among the
    ``candidates`` micro-batches with the most tokens (a plan may hold millions)."""
    from megatron_amopo.data.packing import packed_shape

    seq_lens = split.dataset.group_seq_lens
    tokens = np.add.reduceat(seq_lens[plan.group_ids].sum(axis=1), plan.offsets[:-1])
    best = (0, 0)
    for m in np.argsort(tokens, kind="stable")[-candidates:].tolist():
        lens = seq_lens[plan.microbatch(m)].ravel()
        if cfg.training.batch_layout == "packed":
            rows, width = packed_shape(lens, cfg.training.seq_length)
        else:
            rows, width = len(lens), int(lens.max())
        if rows * width > best[0] * best[1]:
            best = (rows, width)
    return best


def estimate(
    arch: ModelArch,
    cfg: RunConfig,
    world_size: int,
    num_dimensions: int,
    *,
    training: bool,
    rows: Optional[int] = None,
    width: Optional[int] = None,
    device: str = "cuda",
) -> Estimate:
    work, layout = workload_and_layout(cfg, world_size, num_dimensions, rows, width, device)
    peak = memory.peak_memory(arch, work, layout, training=training)
    save_host = memory.save_gather_bytes(arch, layout) if training and cfg.checkpoint.save else 0
    if device == "cpu":  # the rank's resident memory so far (interpreter, libraries, data) stays
        peak = replace(peak, activations=int(peak.activations * CPU_ACTIVATION_FACTOR))
        return Estimate(peak, _own_rss(), save_host, device)
    return Estimate(peak, 0, save_host, device)


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_limit() -> Optional[int]:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:
            return int(value)
    return None


def _own_rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def rank_limit(device: str) -> tuple[Optional[int], str]:
    """Bytes this rank may use and where the number comes from (None: unknown)."""
    if os.environ.get(LIMIT_ENV):
        return int(float(os.environ[LIMIT_ENV]) * GiB), f"{LIMIT_ENV}={os.environ[LIMIT_ENV]}"
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, f"free memory of GPU {torch.cuda.current_device()} ({total / GiB:.1f} GiB in all)"
    return host_limit()


def host_limit() -> tuple[Optional[int], str]:
    """Host memory bytes this rank may use: its share of the cgroup limit or of the available RAM."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    # Memory the node's ranks already hold is theirs to use: add it back to what is available.
    avail = _meminfo_available()
    node = None if avail is None else avail + ranks * _own_rss()
    cgroup = _cgroup_limit()
    if cgroup is not None and (node is None or cgroup < node):
        return cgroup // ranks, f"cgroup memory limit {cgroup / GiB:.1f} GiB / {ranks} rank(s) of this node"
    if node is None:
        return None, "unknown"
    return node // ranks, f"available RAM {node / GiB:.1f} GiB / {ranks} rank(s) of this node"


def _fixes(
    arch: ModelArch,
    cfg: RunConfig,
    world_size: int,
    num_dimensions: int,
    limit: int,
    training: bool,
    rows: Optional[int],
    width: Optional[int],
    device: str,
) -> list[str]:
    """Single changes to the run that bring the estimate under ``limit``."""
    tc, par = cfg.training, cfg.parallel
    _, layout = workload_and_layout(cfg, world_size, num_dimensions, device=device)
    mbs = layout.micro_batch_size

    def est(new_cfg: RunConfig, new_world: int, scale_rows: float = 1.0) -> Estimate:
        r = None if rows is None else max(1, int(np.ceil(rows * scale_rows)))
        return estimate(arch, new_cfg, new_world, num_dimensions, training=training, rows=r, width=width, device=device)

    out = []
    if training and tc.use_distributed_optimizer and cfg.checkpoint.save:
        e = est(replace(cfg, training=replace(tc, use_distributed_optimizer=False)), world_size)
        if e.total <= limit:
            out.append(
                f"no --use-distributed-optimizer: its checkpoint save gathers the optimizer state "
                f"(estimate {e.total / GiB:.2f} GiB)"
            )
    if training and layout.recompute != "full":
        e = est(replace(cfg, training=replace(tc, recompute_granularity="full")), world_size)
        if e.total <= limit:
            out.append(f"--recompute-granularity full (estimate {e.total / GiB:.2f} GiB)")
    for smaller in range(mbs - 1, 0, -1):
        e = est(
            replace(cfg, training=replace(tc, micro_batch_size=smaller, micro_batch_tokens=None)),
            world_size,
            smaller / mbs,
        )
        if e.total <= limit:
            flag = "--micro-batch-size" if tc.micro_batch_size else "--micro-batch-tokens"
            value = smaller if tc.micro_batch_size else smaller * tc.seq_length * 2 * (num_dimensions + 1)
            out.append(f"{flag} {value} (estimate {e.total / GiB:.2f} GiB)")
            break
    for name, size in (("tensor", par.tensor_model_parallel_size), ("pipeline", par.pipeline_model_parallel_size)):
        field = f"{name}_model_parallel_size"
        sp = par.sequence_parallel or name == "tensor"
        new_par = replace(par, sequence_parallel=sp, **{field: size * 2})  # type: ignore[arg-type]
        try:
            validate_layout(arch, new_par.tensor_model_parallel_size, new_par.pipeline_model_parallel_size)
            e = est(replace(cfg, parallel=new_par), world_size * 2)
        except ValueError:
            continue
        if e.total <= limit:
            extra = " --sequence-parallel" if name == "tensor" and not par.sequence_parallel else ""
            out.append(
                f"--{name}-model-parallel-size {size * 2}{extra} on twice the ranks "
                f"(estimate {e.total / GiB:.2f} GiB per rank)"
            )
    return out


def _worst_over_ranks(total: int, limit: Optional[int], device: str) -> tuple[int, Optional[int]]:
    """The largest estimate and the smallest limit of all ranks (None: no rank could read its limit)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return total, limit
    where = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    t = torch.tensor(
        [float(total), -float(limit) if limit is not None else float("-inf")], dtype=torch.float64, device=where
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    worst_limit = -t[1].item()
    return int(t[0].item()), None if worst_limit == float("inf") else int(worst_limit)


def check_memory(
    arch: ModelArch, cfg: RunConfig, split=None, plan=None, *, training: bool = True
) -> Optional[Estimate]:
    """Raise ``InsufficientMemory`` (with the estimate, the limit and the fixes) when the run will not fit.

    Call before the model is built; every rank checks its own limit. Returns the estimate,
    or None when the limit cannot be read.
    """
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    num_dimensions = split.dataset.num_pairs - 1 if split is not None else 3
    rows = width = None
    if split is not None and plan is not None and plan.num_microbatches:
        rows, width = largest_microbatch(split, plan, cfg)
    est = estimate(arch, cfg, world_size, num_dimensions, training=training, rows=rows, width=width, device=device)
    limit, source = rank_limit(device)
    rank0 = is_rank0()
    total, limit = _worst_over_ranks(est.total, limit, device)  # every rank takes the same decision
    if limit is None:
        return None
    summary = (
        f"memory pre-flight: estimated peak per rank {est.describe()}; this rank may use "
        f"{limit / GiB:.2f} GiB ({source})"
    )
    if total <= limit:
        if rank0:
            print(summary, flush=True)
        if device == "cuda" and est.save_host:
            _check_host_save(est, cfg)
        return est
    fixes = _fixes(arch, cfg, world_size, num_dimensions, limit, training, rows, width, device)
    advice = (
        "; ".join(fixes)
        if fixes
        else "none of recompute, a smaller micro-batch or 2x TP/PP alone is enough: combine them or use more memory"
    )
    message = f"{summary}: it will not fit. Fixes that would fit: {advice}. Pass --no-memory-check to start anyway."
    if cfg.training.memory_check:
        raise InsufficientMemory(message)
    if rank0:
        print(
            "warning: "
            + message.replace("Pass --no-memory-check to start anyway.", "Starting anyway (--no-memory-check)."),
            flush=True,
        )
    return est


def _check_host_save(est: Estimate, cfg: RunConfig) -> None:
    """On GPU the distributed optimizer's checkpoint save gathers its state in host memory."""
    limit, source = host_limit()
    need, limit = _worst_over_ranks(est.save_host, limit, "cuda")
    if limit is None or need <= limit:
        return
    message = (
        f"memory pre-flight: a checkpoint save with --use-distributed-optimizer gathers {need / GiB:.2f} GiB of "
        f"optimizer state in host memory on every rank; this rank may use {limit / GiB:.2f} GiB ({source}): "
        "it will not fit. Fixes: more tensor or pipeline parallelism (smaller model shards per rank), or no "
        "--use-distributed-optimizer. Pass --no-memory-check to start anyway."
    )
    if cfg.training.memory_check:
        raise InsufficientMemory(message)
    if is_rank0():
        print("warning: " + message.replace("Pass --no-memory-check to start anyway.", "Starting anyway."), flush=True)
