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


def fill(
    order: list[int],
    max_len: Sequence[int],
    total_len: Sequence[int],
    *,
    seqs_per_group: int,
    groups_per_microbatch: int,
    token_budget: int,
    packed: bool,
) -> tuple[list[int], int]:
    """Greedy fill; returns (bounds into ``order`` incl. the end, groups dropped).

    Fixed k: runs of k, a short last run is dropped. Token budget: append the
    next group while the micro-batch cost stays <= token_budget.
    """
    if groups_per_microbatch > 0:
        bounds = list(range(0, len(order) + 1, groups_per_microbatch))
        return bounds, len(order) - bounds[-1]
    bounds = [0]
    n = cur_max = cur_sum = 0
    for pos, g in enumerate(order):
        if packed:
            fits = cur_sum + total_len[g] <= token_budget
        else:
            fits = seqs_per_group * (n + 1) * max(cur_max, max_len[g]) <= token_budget
        if n > 0 and not fits:
            bounds.append(pos)
            n = cur_max = cur_sum = 0
        n += 1
        cur_max = max(cur_max, max_len[g])
        cur_sum += total_len[g]
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
) -> tuple[list[int], list[int], list[int], int]:
    """Returns (offsets_M1, group_ids_N, epochs_M, dropped_groups) as Python lists."""
    max_len, total_len = list(max_len), list(total_len)
    key = total_len if packed else max_len
    offsets_M1, group_ids_N, epochs_M, dropped = [0], [], [], 0
    for epoch in range(num_epochs):
        order = list(range(len(max_len)))
        shuffle(order, SplitMix64(seed, epoch, STREAM_GROUPS))
        order = sort_windows(order, key, window)
        bounds, tail_dropped = fill(
            order, max_len, total_len, seqs_per_group=seqs_per_group,
            groups_per_microbatch=groups_per_microbatch, token_budget=token_budget, packed=packed,
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
