"""Pure-Python reference of the epoch planner (csrc/planner.cpp), the oracle of the C++ in tests.

It follows docs/PLANNER.md step by step, so the C++ plan can be checked against it for exact
equality; it is slow and assumes inputs that ``data.planner.plan_microbatches`` has validated.
``plan_microbatches`` and ``packed_shapes`` take the arguments of the C++ extension
``megatron_amopo._planner``, so tests pass this module as the planner's ``backend``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import numpy as np

from megatron_amopo.data.packing import packed_shape

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# PRNG stream ids: one stream shuffles the groups, the other the micro-batches.
STREAM_GROUPS = 0
STREAM_MICROBATCHES = 1


def _fmix64(z: int) -> int:
    """splitmix64 output function (Steele, Lea, Flood 2014), modulo 2^64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SplitMix64:
    """splitmix64 stream keyed by (seed, epoch, stream); same numbers as the C++."""

    def __init__(self, seed: int, epoch: int, stream: int) -> None:
        s = _fmix64((seed + _GOLDEN) & _MASK64)
        s = _fmix64(((s ^ epoch) + _GOLDEN) & _MASK64)
        self.state = _fmix64(((s ^ stream) + _GOLDEN) & _MASK64)

    def next(self) -> int:
        self.state = (self.state + _GOLDEN) & _MASK64
        return _fmix64(self.state)


def shuffle(items: list, rng: SplitMix64) -> None:
    """In-place Fisher-Yates from the back, j = floor(draw * (i + 1) / 2^64)."""
    for i in range(len(items) - 1, 0, -1):
        j = (rng.next() * (i + 1)) >> 64
        items[i], items[j] = items[j], items[i]


def sort_windows(order: list[int], key: Sequence[int], window: int) -> list[int]:
    """Stable-sort each window of ``window`` consecutive groups by ``key``."""
    out: list[int] = []
    for lo in range(0, len(order), window):
        out.extend(sorted(order[lo : lo + window], key=key.__getitem__))
    return out


def fill_packed(
    order: list[int],
    seq_lens: Sequence[Sequence[int]],
    total_len: Sequence[int],
    *,
    seq_length: int,
    token_budget: int,
    window: int,
) -> tuple[list[int], list[int]]:
    """Packed token budget, first fit by groups within each window sorted largest first: a group
    joins when its tokens fit and the micro-batch's R * W stays within the budget. Returns (groups
    micro-batch after micro-batch, bounds incl. the end)."""

    def take(rem: list[int]) -> list[int]:
        items = list(seq_lens[rem[0]])
        tokens, chosen = total_len[rem[0]], [rem[0]]
        neg_total = [-total_len[g] for g in rem]  # ascending: bisect finds what fits
        pos = 1
        while True:
            pos = bisect_left(neg_total, tokens - token_budget, pos)
            if pos >= len(rem):
                return chosen
            g = rem[pos]
            pos += 1
            rows, width = packed_shape(items + list(seq_lens[g]), seq_length)
            if rows * width <= token_budget:
                chosen.append(g)
                items, tokens = items + list(seq_lens[g]), tokens + total_len[g]

    return _first_fit_windows(order, window, take)


def _first_fit_windows(order: list[int], window: int, take) -> tuple[list[int], list[int]]:
    """Micro-batches window by window, ``take(remaining)`` picking each (it starts with
    remaining[0]). Returns (groups in order, bounds incl. the end)."""
    out, bounds = [], [0]
    for lo in range(0, len(order), window):
        rem = order[lo : lo + window]
        while rem:
            chosen = take(rem)
            out.extend(chosen)
            bounds.append(len(out))
            taken = set(chosen)
            rem = [g for g in rem if g not in taken]
    return out, bounds


def fill_thd(
    order: list[int], total_len: Sequence[int], *, token_budget: int, window: int
) -> tuple[list[int], list[int]]:
    """THD token budget, first fit by groups within each window sorted largest first: a group
    joins when its total_len fits the free tokens. Returns as :func:`fill_packed`."""

    def take(rem: list[int]) -> list[int]:
        free, chosen = token_budget - total_len[rem[0]], [rem[0]]
        for g in rem[1:]:
            if total_len[g] <= free:
                chosen.append(g)
                free -= total_len[g]
        return chosen

    return _first_fit_windows(order, window, take)


def fill(
    order: list[int],
    max_len: Sequence[int],
    *,
    seqs_per_group: int,
    groups_per_microbatch: int,
    token_budget: int,
) -> tuple[list[int], int]:
    """Fixed k (runs of k, a short last run dropped) or a padded token budget (runs along the
    order while 2P * groups * longest fits). Returns (bounds incl. the end, groups dropped)."""
    if groups_per_microbatch > 0:
        bounds = list(range(0, len(order) + 1, groups_per_microbatch))
        return bounds, len(order) - bounds[-1]
    bounds = [0]
    n = cur_max = 0
    for pos, g in enumerate(order):  # padded budget (packed budgets go to fill_packed)
        if n > 0 and seqs_per_group * (n + 1) * max(cur_max, max_len[g]) > token_budget:
            bounds.append(pos)
            n = cur_max = 0
        n += 1
        cur_max = max(cur_max, max_len[g])
    bounds.append(len(order))
    return bounds, 0


def plan_reference(
    max_len: Sequence[int],
    total_len: Sequence[int],
    *,
    seqs_per_group: int,
    num_epochs: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
    groups_per_microbatch: int,
    token_budget: int,
    packed: bool,
    window: int,
    seq_lens: Sequence[Sequence[int]] = (),
    seq_length: int = 0,
    thd: bool = False,
) -> tuple[list[int], list[int], list[int], int]:
    """(offsets, group_ids, epochs, dropped_groups) as lists; the arguments of the C++
    ``_planner.plan_microbatches`` (``seq_lens`` [G][2P] only for a packed token budget)."""
    max_len, total_len = list(max_len), list(total_len)
    packed_budget = packed and token_budget > 0
    thd_budget = thd and token_budget > 0
    by_total = packed or thd
    key = [-t for t in total_len] if packed_budget or thd_budget else (total_len if by_total else max_len)
    offsets, group_ids, epochs, dropped = [0], [], [], 0
    for epoch in range(num_epochs):
        order = list(range(len(max_len)))
        shuffle(order, SplitMix64(seed, epoch, STREAM_GROUPS))
        order = sort_windows(order, key, window)
        if packed_budget:
            order, bounds = fill_packed(
                order, seq_lens, total_len, seq_length=seq_length, token_budget=token_budget, window=window
            )
        elif thd_budget:
            order, bounds = fill_thd(order, total_len, token_budget=token_budget, window=window)
        else:
            bounds, tail_dropped = fill(
                order,
                max_len,
                seqs_per_group=seqs_per_group,
                groups_per_microbatch=groups_per_microbatch,
                token_budget=token_budget,
            )
            dropped += tail_dropped
        perm = list(range(len(bounds) - 1))
        shuffle(perm, SplitMix64(seed, epoch, STREAM_MICROBATCHES))
        kept = len(perm) - len(perm) % dp_size
        dropped += sum(bounds[mb + 1] - bounds[mb] for mb in perm[kept:])
        for mb in perm[dp_rank:kept:dp_size]:
            group_ids.extend(order[bounds[mb] : bounds[mb + 1]])
            offsets.append(len(group_ids))
            epochs.append(epoch)
    return offsets, group_ids, epochs, dropped


def plan_microbatches(max_len, total_len, *, seq_lens, num_threads: int = 1, **args):
    """``plan_reference`` called like the extension: int64 arrays in (made Python ints, so no cost
    overflows), one thread (a thread count never changes a plan)."""
    del num_threads
    return plan_reference(
        np.asarray(max_len).tolist(), np.asarray(total_len).tolist(), seq_lens=np.asarray(seq_lens).tolist(), **args
    )


def packed_shapes(seq_lens: np.ndarray, seq_length: int) -> np.ndarray:
    """[G, 2]: (rows, width) of the ROW RULE for each row of seq_lens [G, n], like the extension's."""
    shapes = [packed_shape(row, seq_length) for row in np.asarray(seq_lens).tolist()]
    return np.array(shapes, np.int64).reshape(-1, 2)
