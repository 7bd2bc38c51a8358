"""Pure-Python reference of the micro-batch planner in csrc/group_indexer.cpp.

The algorithm is written down in :mod:`megatron_amopo.data.indexer`. This file
follows it step by step in plain Python so the C++ plan can be checked against
it for exact equality; it is slow (about 3 us per group per epoch; a packed token
budget runs the ROW RULE on every candidate, about 3 ms per group) and meant for
tests, not training runs. Inputs are assumed valid: the public wrapper
``megatron_amopo.data.indexer.plan_microbatches`` validates them for both
backends.

Shape legend: G groups, Me micro-batches of one epoch, M micro-batches kept for
this rank (all epochs), N group slots of this rank (= offsets_M1[-1]).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from heapq import heapify, heapreplace
from typing import Sequence

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


def best_fit(free: list[int], lens_desc: Sequence[int], seq_length: int, max_rows: int) -> bool:
    """Best fit: each length (non-increasing order) goes into the row with the least free
    space that holds it, else into a new row of ``seq_length``. ``free`` holds the rows'
    free space, ascending, and is updated in place (a multiset: which row is which does not
    change the count). Returns False as soon as more than ``max_rows`` rows would be needed."""
    for n in lens_desc:
        i = bisect_left(free, n)
        if i < len(free):
            insort(free, free.pop(i) - n)
        elif len(free) < max_rows:
            insort(free, seq_length - n)
        else:
            return False
    return True


def balanced_width(lens_desc: Sequence[int], rows: int) -> int:
    """Longest-processing-time: each length (non-increasing order) goes into the row with the
    least load; returns the largest load. Which row wins a tie does not change the loads."""
    loads = [0] * rows
    heapify(loads)
    for n in lens_desc:
        heapreplace(loads, loads[0] + n)
    return max(loads)


def packed_shape(lengths: Sequence[int], seq_length: int) -> tuple[int, int]:
    """(rows R, width W) of the packed layout for these sequence lengths (the ROW RULE).

    Candidates, in this order: best fit decreasing into rows of ``seq_length`` (R0 rows, W =
    its fullest row), then longest-processing-time into R rows for R = ceil(sum / seq_length)
    .. R0 (W = its fullest row, kept when W <= seq_length). The first candidate with the least
    R * W wins.
    """
    lens = sorted(lengths, reverse=True)
    free: list[int] = []
    best_fit(free, lens, seq_length, len(lens))
    best = (len(free), seq_length - free[0])
    for rows in range(-(-sum(lens) // seq_length), best[0] + 1):
        width = balanced_width(lens, rows)
        if width <= seq_length and rows * width < best[0] * best[1]:
            best = (rows, width)
    return best


def pack_rows(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """The packed layout's rows: sequence indices per row, in placement order.

    Sequences by length, longest first (ties: lower index first), placed by the candidate
    :func:`packed_shape` picks: best fit decreasing (each into the open row with the least free
    space that holds it, ties: the lower row, else a new row) or longest-processing-time into
    R rows (each into the row with the least load, ties: the lower row).
    """
    rows_wanted, width = packed_shape(lengths, seq_length)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []
    rows: list[list[int]] = []
    for n in order:  # best fit decreasing
        fits = [r for r in range(len(rows)) if free[r] >= lengths[n]]
        r = min(fits, key=lambda r: (free[r], r)) if fits else len(rows)
        if not fits:
            rows.append([])
            free.append(seq_length)
        rows[r].append(n)
        free[r] -= lengths[n]
    if len(rows) == rows_wanted and seq_length - min(free) == width:
        return rows
    rows, load = [[] for _ in range(rows_wanted)], [0] * rows_wanted
    for n in order:  # longest-processing-time
        r = min(range(rows_wanted), key=lambda r: (load[r], r))
        rows[r].append(n)
        load[r] += lengths[n]
    return rows


def fill_packed(
    order: list[int],
    seq_lens: Sequence[Sequence[int]],
    total_len: Sequence[int],
    *,
    seq_length: int,
    token_budget: int,
    window: int,
) -> tuple[list[int], list[int]]:
    """Packed token budget; returns (groups micro-batch after micro-batch, bounds incl. the end).

    ``order`` is window-sorted by total_len, largest first. A micro-batch starts with its
    window's largest remaining group and takes, in order, every later remaining group whose
    tokens fit the free tokens and with which the micro-batch's :func:`packed_shape` costs
    R * W <= token_budget. Never crosses a window.
    """
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
    """Micro-batches window by window: ``take(remaining)`` picks the next one (starting with
    remaining[0]) until the window is used up. Returns (groups in order, bounds incl. the end)."""
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
    """THD token budget; returns (groups micro-batch after micro-batch, bounds incl. the end).

    ``order`` is window-sorted by total_len, largest first. A micro-batch starts with its
    window's largest remaining group and takes, in order, every later remaining group whose
    total_len fits the free tokens (token_budget - tokens taken so far): first-fit decreasing
    by groups. Never crosses a window.
    """
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
    total_len: Sequence[int],
    *,
    seqs_per_group: int,
    groups_per_microbatch: int,
    token_budget: int,
) -> tuple[list[int], int]:
    """Greedy fill; returns (bounds into ``order`` incl. the end, groups dropped).

    Fixed k: runs of k, a short last run is dropped. Padded token budget: append
    the next group while the micro-batch cost stays <= token_budget.
    """
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
    """Returns (offsets_M1, group_ids_N, epochs_M, dropped_groups) as Python lists.

    A packed token budget (packed and token_budget > 0) needs ``seq_lens`` [G][2P] and
    ``seq_length``; each of its micro-batches costs R * W <= token_budget (:func:`packed_shape`).
    ``thd`` (cost="thd", not with packed): a micro-batch costs the sum of its groups' total_len.
    """
    max_len, total_len = list(max_len), list(total_len)
    packed_budget = packed and token_budget > 0
    thd_budget = thd and token_budget > 0
    by_total = packed or thd
    key = [-t for t in total_len] if packed_budget or thd_budget else (total_len if by_total else max_len)
    offsets_M1, group_ids_N, epochs_M, dropped = [0], [], [], 0
    for epoch in range(num_epochs):
        order = list(range(len(max_len)))
        shuffle(order, SplitMix64(seed, epoch, STREAM_GROUPS))
        order = sort_windows(order, key, window)
        if packed_budget:
            order, bounds = fill_packed(order, seq_lens, total_len, seq_length=seq_length,
                                        token_budget=token_budget, window=window)
        elif thd_budget:
            order, bounds = fill_thd(order, total_len, token_budget=token_budget, window=window)
        else:
            bounds, tail_dropped = fill(
                order, max_len, total_len, seqs_per_group=seqs_per_group,
                groups_per_microbatch=groups_per_microbatch, token_budget=token_budget,
            )
            dropped += tail_dropped
        perm_Me = list(range(len(bounds) - 1))
        shuffle(perm_Me, SplitMix64(seed, epoch, STREAM_MICROBATCHES))
        kept = len(perm_Me) - len(perm_Me) % dp_size
        dropped += sum(bounds[mb + 1] - bounds[mb] for mb in perm_Me[kept:])
        for mb in perm_Me[dp_rank:kept:dp_size]:
            group_ids_N.extend(order[bounds[mb] : bounds[mb + 1]])
            offsets_M1.append(len(group_ids_N))
            epochs_M.append(epoch)
    return offsets_M1, group_ids_N, epochs_M, dropped
