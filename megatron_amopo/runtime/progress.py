"""One progress bar for every long operation: tqdm on stderr (count, rate, ETA), global rank 0 only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Optional

from tqdm import tqdm


def _rank0() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def progress(
    iterable: Optional[Iterable] = None,
    *,
    total: Optional[int] = None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
) -> tqdm:
    """A bar for ``iterable`` (or ``total`` steps fed with ``update``); silent off rank 0 or when not ``enabled``.

    Into a log file (stderr not a terminal) it redraws at most every 30 s, so a log
    keeps a few lines with the ETA rather than one per step.
    """
    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not (enabled and _rank0()),
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
    )
