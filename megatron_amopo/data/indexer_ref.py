"""Pure-Python reference of the micro-batch planner in csrc/group_indexer.cpp.

The algorithm is written down in :mod:`megatron_amopo.data.indexer`. This file
follows it step by step in plain Python so the C++ plan can be checked against
it for exact equality; it is slow (about 3 us per group per epoch) and meant for
tests, not training runs. Inputs are assumed valid: the public wrapper
``megatron_amopo.data.indexer.plan_microbatches`` validates them for both
backends.

Shape legend: G groups, Me micro-batches of one epoch, M micro-batches kept for
this rank (all epochs), N group slots of this rank (= offsets_M1[-1]).
"""

from __future__ import annotations

from bisect import bisect_left, insort
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


def pack_rows(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """The packed layout's rows: sequence indices per row, in placement order.

    Best fit decreasing: sequences by length, longest first (ties: lower index first), each
    into the open row with the least free space that holds it (ties: the lower row), else a
    new row. Same row count as :func:`best_fit` on the sorted lengths.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for n in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[n]]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
        else:
            r = len(rows)
            rows.append([])
            free.append(seq_length)
        rows[r].append(n)
        free[r] -= lengths[n]
    return rows


def fill_packed(
    order: list[int],
    seq_lens: Sequence[Sequence[int]],
    total_len: Sequence[int],
    max_len: Sequence[int],
    *,
    seq_length: int,
    max_rows: int,
    window: int,
) -> tuple[list[int], list[int]]:
    """Packed token budget; returns (groups micro-batch after micro-batch, bounds incl. the end).

    ``order`` is window-sorted by total_len, largest first. A micro-batch starts with its
    window's largest remaining group and takes, in order, every later remaining group whose
    tokens fit the free tokens, that fits by best fit on top of the rows built so far group
    by group (a cheap filter), and with which the best fit of all the micro-batch's sequences,
    longest first (the builder's rule), needs <= max_rows rows. Never crosses a window.
    """
    capacity = max_rows * seq_length
    out, bounds = [], [0]
    for lo in range(0, len(order), window):
        rem = order[lo : lo + window]
        while rem:
            items = sorted(seq_lens[rem[0]], reverse=True)
            proxy: list[int] = []
            best_fit(proxy, items, seq_length, max_rows)
            tokens, take = total_len[rem[0]], [rem[0]]
            neg_total = [-total_len[g] for g in rem]  # ascending: bisect finds what fits
            pos = 1
            while True:
                pos = bisect_left(neg_total, tokens - capacity, pos)
                if pos >= len(rem):
                    break
                g = rem[pos]
                pos += 1
                if len(proxy) == max_rows and proxy[-1] < max_len[g]:
                    continue
                mine = sorted(seq_lens[g], reverse=True)
                trial = proxy[:]
                if not best_fit(trial, mine, seq_length, max_rows):
                    continue
                merged = sorted(items + mine, reverse=True)
                if not best_fit([], merged, seq_length, max_rows):
                    continue
                take.append(g)
                items, proxy, tokens = merged, trial, tokens + total_len[g]
            out.extend(take)
            bounds.append(len(out))
            taken = set(take)
            rem = [g for g in rem if g not in taken]
    return out, bounds


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
) -> tuple[list[int], list[int], list[int], int]:
    """Returns (offsets_M1, group_ids_N, epochs_M, dropped_groups) as Python lists.

    A packed token budget (packed and token_budget > 0) needs ``seq_lens`` [G][2P] and
    ``seq_length``; its micro-batches hold at most token_budget // seq_length rows.
    """
    max_len, total_len = list(max_len), list(total_len)
    packed_budget = packed and token_budget > 0
    key = [-t for t in total_len] if packed_budget else (total_len if packed else max_len)
    offsets_M1, group_ids_N, epochs_M, dropped = [0], [], [], 0
    for epoch in range(num_epochs):
        order = list(range(len(max_len)))
        shuffle(order, SplitMix64(seed, epoch, STREAM_GROUPS))
        order = sort_windows(order, key, window)
        if packed_budget:
            order, bounds = fill_packed(order, seq_lens, total_len, max_len, seq_length=seq_length,
                                        max_rows=token_budget // seq_length, window=window)
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
