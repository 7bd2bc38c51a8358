"""Profiling chosen training steps on chosen ranks (``--profile``, Megatron-LM's flag names).

Megatron-LM picks one tool per run (``--use-pytorch-profiler`` or nsys); here both are on, since
neither costs anything when not used: a torch profiler records the window's CPU (and CUDA)
activity into a Chrome trace, and on a GPU ``cudaProfilerStart``/``Stop`` bound the window for
``nsys profile --capture-range=cudaProfilerApi`` while an NVTX range names each step. Every
profiled step is also a ``record_function`` range ``amopo_step_N`` in the trace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch

from megatron_amopo.config import ProfileConfig

STEP_RANGE = "amopo_step_{}"


class StepProfiler:
    """Profiles steps ``profile_step_start..profile_step_end`` (1-based, inclusive) on this rank
    if it is one of ``profile_ranks``; a run resumed inside the window profiles what is left."""

    def __init__(self, cfg: ProfileConfig, run_dir: str, rank: int, world_size: int) -> None:
        if cfg.profile and max(cfg.profile_ranks) >= world_size:
            raise ValueError(
                f"--profile-ranks {cfg.profile_ranks} names ranks that this run of {world_size} processes does not "
                f"have; choose ranks below {world_size}"
            )
        self.cfg, self.rank = cfg, rank
        self.enabled = cfg.profile and rank in cfg.profile_ranks
        self.out_dir = os.path.join(run_dir, "profile")
        self._prof: Optional[torch.profiler.profile] = None
        self._first = self._last = 0
        self._cuda = torch.cuda.is_available()

    @contextlib.contextmanager
    def step(self, iteration: int) -> Iterator[None]:
        """Wrap the step that will be number ``iteration``."""
        if not (self.enabled and self.cfg.profile_step_start <= iteration <= self.cfg.profile_step_end):
            yield
            return
        if self._prof is None:
            self._start(iteration)
        name = STEP_RANGE.format(iteration)
        if self._cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            if self._cuda:
                torch.cuda.nvtx.range_pop()
        self._last = iteration
        if iteration == self.cfg.profile_step_end:
            self.close()

    def _start(self, iteration: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()  # the window starts with no earlier work in flight
            torch.cuda.profiler.start()
        self._first = iteration
        self._prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.profile_record_shapes)
        self._prof.start()

    def close(self) -> Optional[str]:
        """Stop a running window (also when the run ends inside it) and write its trace; returns its path."""
        if self._prof is None:
            return None
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        self._prof.stop()
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"trace_rank{self.rank}_steps{self._first}-{self._last}.json")
        self._prof.export_chrome_trace(path)
        self._prof = None
        return path
