"""The ROW RULE: how a packed micro-batch's sequences are laid out in R rows of width W <= S.

The batch builder lays rows out by :func:`pack_rows` and the planner charges a micro-batch the
R * W of :func:`packed_shape`, so a planned micro-batch gets exactly the rows it was charged for
(rule and rationale: docs/PLANNER.md; the C++ twin is csrc/packing.cpp).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from heapq import heapify, heapreplace

import numpy as np


def _checked(lengths, seq_length: int) -> list[int]:
    lens = list(lengths) if isinstance(lengths, (list, tuple)) else np.asarray(lengths).ravel().tolist()
    if not lens:
        raise ValueError("need at least one sequence length")
    if not (min(lens) >= 1 and max(lens) <= seq_length):
        raise ValueError(
            f"sequence lengths must be in [1, seq_length={seq_length}], got {min(lens) if min(lens) < 1 else max(lens)}"
        )
    return lens


def _best_fit_free(lens_desc: Sequence[int], seq_length: int) -> list[int]:
    """Best fit decreasing into rows of S: the rows' free space, ascending (a multiset)."""
    free: list[int] = []
    for n in lens_desc:
        i = bisect_left(free, n)
        insort(free, free.pop(i) - n if i < len(free) else seq_length - n)
    return free


def _balanced_width(lens_desc: Sequence[int], rows: int) -> int:
    """Longest-processing-time into ``rows`` rows: the fullest row's load."""
    loads = [0] * rows
    heapify(loads)
    for n in lens_desc:
        heapreplace(loads, loads[0] + n)
    return max(loads)


def packed_shape(lengths, seq_length: int) -> tuple[int, int]:
    """(rows R, width W) of the ROW RULE for these sequence lengths (any int array, flattened)."""
    lens = sorted(_checked(lengths, seq_length), reverse=True)
    free = _best_fit_free(lens, seq_length)
    best = (len(free), seq_length - free[0])
    for rows in range(-(-sum(lens) // seq_length), best[0] + 1):
        width = _balanced_width(lens, rows)
        if width <= seq_length and rows * width < best[0] * best[1]:
            best = (rows, width)
    return best


def packed_rows(lengths, seq_length: int) -> int:
    """Rows R of the ROW RULE (``packed_shape(...)[0]``)."""
    return packed_shape(lengths, seq_length)[0]


def pack_rows(lengths, seq_length: int) -> list[list[int]]:
    """The ROW RULE's rows: sequence indices per row, in placement order (longest first, ties:
    lower index), placed by the candidate :func:`packed_shape` picks (ties: the lower row)."""
    lens = _checked(lengths, seq_length)
    rows_wanted, width = packed_shape(lens, seq_length)
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    free: list[int] = []
    rows: list[list[int]] = []
    for n in order:  # best fit decreasing
        fits = [r for r in range(len(rows)) if free[r] >= lens[n]]
        r = min(fits, key=lambda r: (free[r], r)) if fits else len(rows)
        if not fits:
            rows.append([])
            free.append(seq_length)
        rows[r].append(n)
        free[r] -= lens[n]
    if len(rows) == rows_wanted and seq_length - min(free) == width:
        return rows
    rows, load = [[] for _ in range(rows_wanted)], [0] * rows_wanted
    for n in order:  # longest-processing-time
        r = min(range(rows_wanted), key=lambda r: (load[r], r))
        rows[r].append(n)
        load[r] += lens[n]
    return rows
