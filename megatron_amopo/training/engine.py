"""The engine: the one place a step runs. Every path that moves micro-batches through the model
(training, the trainer's and ``tools/evaluate.py``'s evaluation, the converter's logit check,
the step benchmark, the tests) goes through ``Engine.forward_backward``; every optimizer update
through ``Engine.step``.

``forward_backward`` zeroes the gradient buffers (training) and runs Megatron-Core's schedule
(1F1B with PP, ``get_forward_backward_func``) over this rank's micro-batches; the schedule calls
the bound ``forward_step`` (``training.step``) per micro-batch and returns the last stage's
reports. ``reduce`` sums them over ranks in one all-reduce (``metrics.reduce_reports``).
``evaluate`` is a forward-only pass over a plan with the same reduction.

Shapes: R rows and S positions of a micro-batch (``data.batch.MicroBatch``), P pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from megatron_amopo.data.batch import MicroBatch
from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.objective.amopo import PAIR_METRIC_NAMES
from megatron_amopo.training.metrics import HostCounts, StepTotals, reduce_reports
from megatron_amopo.training.throughput import training_flops

# What the schedule feeds: a MicroBatch, or for a forward step of one's own (the converter's logit
# check, tests) a token tensor [R, S] or a mapping with one under "tokens".
Feed = Union[MicroBatch, torch.Tensor, Mapping[str, torch.Tensor]]


def is_reporting_rank() -> bool:
    """One rank per DP replica reports step values: last stage, TP rank 0, CP rank 0."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    )


def _shape(item: Feed) -> tuple[int, int]:
    """(rows R, positions S) of what the schedule feeds."""
    if isinstance(item, MicroBatch):
        tokens = item.tokens
    elif isinstance(item, torch.Tensor):
        tokens = item
    else:
        tokens = item["tokens"]
    return int(tokens.shape[0]), int(tokens.shape[1])


class Engine:
    """This rank's model chunks, the bound forward step and (training) the optimizer and scheduler.

    ``model``: the Megatron DDP-wrapped chunks of ``model.build.build_model``. ``forward_step``:
    Megatron's ``forward_step_func`` (``training.step.bind_forward_step``). ``optimizer`` and
    ``scheduler`` are needed by ``step`` only (evaluation and checks run without them).
    """

    def __init__(
        self,
        model: list[Any],
        forward_step: Callable[..., Any],
        optimizer: Any = None,
        scheduler: Any = None,
    ) -> None:
        self.model, self.forward_step = model, forward_step
        self.optimizer, self.scheduler = optimizer, scheduler

    def forward_backward(
        self, batches: Sequence[Feed], forward_only: bool = False, forward_step: Optional[Callable[..., Any]] = None
    ) -> list[Any]:
        """Megatron's schedule over this rank's micro-batches of one step; the last stage's reports
        (``training.step.StepReport``s for the AMoPO step), [] elsewhere or without micro-batches.

        Training (``forward_only`` False) zeroes the gradient buffers first and leaves the step's
        gradients, finalised over DP by the schedule, for ``step``. ``forward_step``: another
        forward step for this call (default: the engine's)."""
        if not batches:
            return []
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not forward_only:
            for chunk in self.model:
                chunk.zero_grad_buffer()
            if self.optimizer is not None:
                self.optimizer.zero_grad()
        rows, width = (max(dims) for dims in zip(*(_shape(b) for b in batches)))
        return get_forward_backward_func()(
            forward_step_func=forward_step or self.forward_step,
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=width,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    def step(self, increment: int) -> float:
        """The optimizer update from the gradients of the last ``forward_backward``, then the
        scheduler's advance by ``increment`` samples; returns the gradient norm (nan if unknown)."""
        if self.optimizer is None:
            raise RuntimeError("Engine.step needs an optimizer: build the engine with one")
        _, grad_norm, _ = self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step(increment=increment)
        return float(grad_norm) if grad_norm is not None else float("nan")

    def reduce(
        self,
        reports: Sequence[Any],
        batches: Sequence[MicroBatch],
        num_pairs: int,
        stop: bool = False,
        arch: Optional[ModelArch] = None,
    ) -> StepTotals:
        """Global sums of a step's reports, the groups, real tokens and (given ``arch``) model FLOPs
        it processed, and ``stop`` (> 0 when any rank asks to stop): one all-reduce per step."""
        reporting = is_reporting_rank()
        host = HostCounts(stop=float(stop))
        if reporting:
            lengths = [n for b in batches for n in b.seq_lengths]  # positions per sequence
            host.groups = float(sum(len(b.sample_ids) for b in batches))
            host.tokens = float(sum(lengths))
            host.flops = training_flops(arch, lengths) if arch is not None else 0.0
        return reduce_reports(reports, reporting, num_pairs, len(PAIR_METRIC_NAMES), host)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The chunks in eval mode, gradients off; back to training mode afterwards."""
        for chunk in self.model:
            chunk.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for chunk in self.model:
                chunk.train()

    def evaluate(
        self, batches: Iterable[MicroBatch], num_pairs: int, on_microbatch: Optional[Callable[[], None]] = None
    ) -> tuple[StepTotals, list[Any]]:
        """A forward-only pass over ``batches`` (this rank's share; may be empty on some DP ranks):
        the totals over all ranks and this rank's reports. ``on_microbatch``: called once per
        micro-batch on this rank's stage (progress)."""
        step = self.forward_step
        if on_microbatch is not None:

            def step(*args: Any, **kwargs: Any) -> Any:
                out = self.forward_step(*args, **kwargs)
                on_microbatch()
                return out

        with self.eval_mode():
            batches = list(batches)
            reports = self.forward_backward(batches, forward_only=True, forward_step=step)
            return self.reduce(reports, batches, num_pairs), reports
