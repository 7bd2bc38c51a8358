"""Micro-batch plans for AMoPO groups: which groups share a micro-batch, and which DP rank gets it.

All 2P sequences of a group must sit in one micro-batch. Inputs are validated here, once; then the
C++ planner (``csrc/``, module ``megatron_amopo._planner``, built by ``pip install -e .``) plans.
Tests pass the slow pure-Python reference (``megatron_amopo.testing.planner_reference``) as
``backend`` and get identical plans. Algorithm, costs and guarantees: docs/PLANNER.md.

Shapes: G groups, P pairs per group (2P sequences), S positions per row, M micro-batches of a rank.
"""

from __future__ import annotations

import dataclasses
import importlib
import operator
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal, Optional

import numpy as np

from megatron_amopo.data.packing import packed_shape

_MAX_LENGTH = 1 << 40  # with the next two, every cost the C++ computes fits in int64 (int128 where noted)
_MAX_SEQS_PER_GROUP = 1 << 20
_MAX_BUDGET = 1 << 62
_MAX_THREADS = 256
_DEFAULT_THREADS_CAP = 16  # windows are short; more threads mostly wait on memory

_BUILD_HINT = (
    "the C++ extension megatron_amopo._planner is not built; run `pip install -e .` from the "
    "repository root (needs a C++17 compiler and pybind11)"
)


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan:
    """One DP rank's micro-batches; micro-batch m is group_ids[offsets[m]:offsets[m+1]]."""

    offsets: np.ndarray
    """int64 [M + 1], offsets[0] == 0."""
    group_ids: np.ndarray
    """int64 [offsets[-1]], group ids, micro-batch after micro-batch, epoch after epoch."""
    epochs: np.ndarray
    """int64 [M], epoch of each micro-batch."""
    dropped_groups: int
    """Group slots dropped over all epochs (short fixed-k tails + incomplete DP rounds)."""

    @property
    def num_microbatches(self) -> int:
        return len(self.epochs)

    def microbatch(self, m: int) -> np.ndarray:
        """Group ids of micro-batch m."""
        return self.group_ids[self.offsets[m] : self.offsets[m + 1]]


def default_num_threads() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one), at most 16.

    Every rank plans at the same time: when the process is not bound to a subset of the
    machine's CPUs, they are shared among torchrun's ``LOCAL_WORLD_SIZE`` ranks of the node.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if cpus and cpus == os.cpu_count() and local_ranks > 1:
        cpus //= local_ranks
    return max(1, min(cpus or 1, _DEFAULT_THREADS_CAP))


def load_extension() -> ModuleType:
    """Imports the C++ planner, or raises ImportError saying how to build it."""
    try:
        return importlib.import_module("megatron_amopo._planner")
    except ImportError as err:
        raise ImportError(_BUILD_HINT) from err


def _as_lengths(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per group), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers (token counts), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_scalars(*, seqs_per_group, num_epochs, seed, dp_rank, dp_size, k, budget, window, threads):
    if not (2 <= seqs_per_group <= _MAX_SEQS_PER_GROUP and seqs_per_group % 2 == 0):
        raise ValueError(f"seqs_per_group must be an even number 2P in [2, 2^20], got {seqs_per_group}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if (k is None) == (budget is None):
        raise ValueError(
            "give exactly one of groups_per_microbatch or token_budget "
            f"(got groups_per_microbatch={k}, token_budget={budget})"
        )
    if k is not None and k < 1:
        raise ValueError(f"groups_per_microbatch must be >= 1, got {k}")
    if budget is not None and not 1 <= budget <= _MAX_BUDGET:
        raise ValueError(f"token_budget must be in [1, 2^62], got {budget}")
    if not 1 <= threads <= _MAX_THREADS:
        raise ValueError(f"num_threads must be in [1, {_MAX_THREADS}], got {threads}")


def _as_seq_lens(seq_lens, max_len, total_len, seqs_per_group: int):
    """[G, 2P] int64 lengths; max_len/total_len derived from them when not given."""
    seq_lens_G2P = np.asarray(seq_lens)
    if seq_lens_G2P.ndim != 2 or seq_lens_G2P.shape[1] != seqs_per_group:
        raise ValueError(f"seq_lens must be [G, seqs_per_group={seqs_per_group}], got shape {seq_lens_G2P.shape}")
    if seq_lens_G2P.size and not np.issubdtype(seq_lens_G2P.dtype, np.integer):
        raise TypeError(f"seq_lens must hold integers (token counts), got dtype {seq_lens_G2P.dtype}")
    seq_lens_G2P = np.ascontiguousarray(seq_lens_G2P, dtype=np.int64)
    if max_len is None:
        max_len = seq_lens_G2P.max(axis=1) if len(seq_lens_G2P) else np.zeros(0, np.int64)
    if total_len is None:
        total_len = seq_lens_G2P.sum(axis=1)
    return seq_lens_G2P, max_len, total_len


def _check_lengths(max_len_G, total_len_G, *, seqs_per_group: int) -> None:
    if len(max_len_G) != len(total_len_G):
        raise ValueError(
            f"max_len and total_len must have the same length, got {len(max_len_G)} and {len(total_len_G)}"
        )
    if len(max_len_G) == 0:
        raise ValueError("need at least one group, got 0")
    out_of_range_G = (max_len_G < 1) | (max_len_G > _MAX_LENGTH) | (total_len_G < 1) | (total_len_G > _MAX_LENGTH)
    inconsistent_G = (total_len_G < max_len_G) | (total_len_G > seqs_per_group * max_len_G)
    bad = np.flatnonzero(out_of_range_G | inconsistent_G)
    if bad.size:
        g = int(bad[0])
        ml, tl = int(max_len_G[g]), int(total_len_G[g])
        if out_of_range_G[g]:
            raise ValueError(f"group {g}: lengths must be in [1, 2^40], got max_len={ml} total_len={tl}")
        raise ValueError(
            f"group {g}: need max_len <= total_len <= seqs_per_group * max_len, got "
            f"max_len={ml} total_len={tl} seqs_per_group={seqs_per_group}"
        )


def _check_seq_lens(seq_lens_G2P, max_len_G, total_len_G, *, seq_length: int) -> None:
    bad_G2P = (seq_lens_G2P < 1) | (seq_lens_G2P > seq_length)
    mismatch_G = (seq_lens_G2P.max(axis=1) != max_len_G) | (seq_lens_G2P.sum(axis=1) != total_len_G)
    bad = np.flatnonzero(bad_G2P.any(axis=1) | mismatch_G)
    if bad.size:
        g = int(bad[0])
        if bad_G2P[g].any():
            j = int(np.flatnonzero(bad_G2P[g])[0])
            raise ValueError(
                f"group {g}: sequence lengths must be in [1, seq_length={seq_length}], "
                f"got {int(seq_lens_G2P[g, j])} at index {j}"
            )
        raise ValueError(
            f"group {g}: seq_lens give max {int(seq_lens_G2P[g].max())} and sum "
            f"{int(seq_lens_G2P[g].sum())}, but max_len={int(max_len_G[g])} "
            f"total_len={int(total_len_G[g])}"
        )


def _packed_shapes(seq_lens_G2P, total_len_G, *, seq_length: int, budget: int, backend: ModuleType) -> np.ndarray:
    """[G, 2] (R, W) of each group alone, or (0, 0) where R * W <= budget needs no layout: the rule's
    R * W is at most S * min(2P, ceil(2 * total / S)) (docs/PLANNER.md, "Budget check")."""
    bound_G = seq_length * np.minimum(seq_lens_G2P.shape[1], -(-2 * total_len_G // seq_length))
    unsure = np.flatnonzero(bound_G > budget)
    shape_G2 = np.zeros((len(total_len_G), 2), np.int64)
    if unsure.size:
        shape_G2[unsure] = backend.packed_shapes(seq_lens_G2P[unsure], seq_length)
    return shape_G2


def _refuse_over_budget(cost_G, budget: int, describe: Callable[[int], str]) -> None:
    """ValueError naming the first group whose cost alone is above the budget (``describe(g)``: how
    its cost is counted) and the least budget that fits every group."""
    over = np.flatnonzero(cost_G > budget)
    if over.size:
        g = int(over[0])
        raise ValueError(
            f"group {g} alone costs {int(cost_G[g])} tokens ({describe(g)}), above "
            f"token_budget={budget}; the minimum budget that fits every group "
            f"is {int(cost_G.max())}"
        )


def _check_budget(
    max_len_G,
    total_len_G,
    seq_lens_G2P,
    *,
    seqs_per_group: int,
    budget: int,
    cost: str,
    seq_length: int,
    backend: ModuleType,
) -> None:
    if cost == "packed":
        shape_G2 = _packed_shapes(seq_lens_G2P, total_len_G, seq_length=seq_length, budget=budget, backend=backend)
        _refuse_over_budget(
            shape_G2[:, 0] * shape_G2[:, 1],
            budget,
            lambda g: f"packed: {int(shape_G2[g, 0])} rows of {int(shape_G2[g, 1])} positions",
        )
    elif cost == "thd":
        _refuse_over_budget(total_len_G, budget, lambda g: "thd: the sum of its sequence lengths")
    else:
        _refuse_over_budget(seqs_per_group * max_len_G, budget, lambda g: "padded")


def plan_microbatches(
    max_len=None,
    total_len=None,
    *,
    seqs_per_group: int,
    num_epochs: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
    groups_per_microbatch: Optional[int] = None,
    token_budget: Optional[int] = None,
    cost: Literal["padded", "packed", "thd"] = "padded",
    window: int = 512,
    seq_lens=None,
    seq_length: Optional[int] = None,
    backend: Optional[ModuleType] = None,
    num_threads: Optional[int] = None,
) -> MicrobatchPlan:
    """Plans this DP rank's micro-batches over ``num_epochs`` epochs (docs/PLANNER.md).

    ``max_len``/``total_len``: int [G], each group's longest sequence and its 2P lengths' sum. Give
    exactly one of ``groups_per_microbatch`` (fixed k) or ``token_budget`` (the most a micro-batch
    may cost under ``cost``). cost="packed" with a budget also needs ``seq_lens`` int [G, 2P]
    (max_len and total_len may then be left out) and ``seq_length`` S. ``backend``: the module that
    plans, with the extension's ``plan_microbatches`` and ``packed_shapes``; None loads the C++
    extension (never a fallback), tests pass ``megatron_amopo.testing.planner_reference``.
    ``num_threads``: C++ threads for packed and THD budgets (default: this process's CPUs, at most
    16); the plan does not depend on it.
    """
    if cost not in ("padded", "packed", "thd"):
        raise ValueError(f"cost must be 'padded', 'packed' or 'thd', got {cost!r}")
    ints = dict(
        seqs_per_group=seqs_per_group, num_epochs=num_epochs, seed=seed, dp_rank=dp_rank, dp_size=dp_size, window=window
    )
    ints = {name: operator.index(v) for name, v in ints.items()}  # rejects floats with TypeError
    k = None if groups_per_microbatch is None else operator.index(groups_per_microbatch)
    budget = None if token_budget is None else operator.index(token_budget)
    threads = default_num_threads() if num_threads is None else operator.index(num_threads)
    _check_scalars(**ints, k=k, budget=budget, threads=threads)
    packed_budget = cost == "packed" and budget is not None
    seq_lens_G2P = np.zeros((0, 0), np.int64)
    row_length = 0  # seq_length S where packed micro-batches are charged by rows, else unused
    if packed_budget:
        if seq_lens is None or seq_length is None:
            raise ValueError(
                "cost='packed' with token_budget needs seq_lens [G, 2P] and seq_length: "
                "packed micro-batches are charged by rows of at most seq_length positions"
            )
        row_length = operator.index(seq_length)
        if not 1 <= row_length <= _MAX_LENGTH:
            raise ValueError(f"seq_length must be in [1, 2^40], got {row_length}")
        seq_lens_G2P, max_len, total_len = _as_seq_lens(seq_lens, max_len, total_len, ints["seqs_per_group"])
    if max_len is None or total_len is None:
        raise ValueError(
            "max_len and total_len are required unless seq_lens is given (cost='packed' with token_budget)"
        )
    max_len_G, total_len_G = _as_lengths("max_len", max_len), _as_lengths("total_len", total_len)
    if packed_budget and len(seq_lens_G2P) != len(max_len_G):
        raise ValueError(f"seq_lens has {len(seq_lens_G2P)} groups, max_len {len(max_len_G)}")
    _check_lengths(max_len_G, total_len_G, seqs_per_group=ints["seqs_per_group"])
    if packed_budget:
        _check_seq_lens(seq_lens_G2P, max_len_G, total_len_G, seq_length=row_length)
    backend = load_extension() if backend is None else backend
    if budget is not None:
        _check_budget(
            max_len_G,
            total_len_G,
            seq_lens_G2P,
            seqs_per_group=ints["seqs_per_group"],
            budget=budget,
            cost=cost,
            seq_length=row_length,
            backend=backend,
        )
    args: dict[str, Any] = dict(  # int and bool arguments of both backends
        **ints,
        groups_per_microbatch=k or 0,
        token_budget=budget or 0,
        packed=cost == "packed",
        thd=cost == "thd",
        seq_length=row_length,
    )
    out = backend.plan_microbatches(max_len_G, total_len_G, seq_lens=seq_lens_G2P, num_threads=threads, **args)
    offsets, group_ids, epochs, dropped = out
    return MicrobatchPlan(
        offsets=np.asarray(offsets, dtype=np.int64),
        group_ids=np.asarray(group_ids, dtype=np.int64),
        epochs=np.asarray(epochs, dtype=np.int64),
        dropped_groups=int(dropped),
    )


def padding_efficiency(
    plan: MicrobatchPlan,
    seq_lens_G2P: np.ndarray,
    *,
    cost: Literal["padded", "packed", "thd"],
    seq_length: Optional[int] = None,
    pad_to_multiple: int = 1,
) -> float:
    """Real tokens / tokens processed over every micro-batch of ``plan``; ``seq_lens_G2P``: int
    [G, 2P]. Tokens processed: padded, 2P * groups * longest; packed, the ROW RULE's R * W; thd, the
    real tokens rounded up to a multiple of ``pad_to_multiple`` (``data.batch.build_micro_batch(thd=True)``).
    """
    seq_lens_G2P = np.asarray(seq_lens_G2P, dtype=np.int64)
    if seq_lens_G2P.ndim != 2:
        raise ValueError(f"seq_lens_G2P must be [G, 2P], got shape {seq_lens_G2P.shape}")
    if plan.num_microbatches == 0:
        raise ValueError("the plan has no micro-batches")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    slot_lens = seq_lens_G2P[plan.group_ids]  # [group slots of the plan, 2P]
    real = int(slot_lens.sum())
    starts_M = plan.offsets[:-1]
    if cost == "thd":
        real_M = np.add.reduceat(slot_lens.sum(axis=1), starts_M)
        return real / int((-(-real_M // pad_to_multiple) * pad_to_multiple).sum())
    if cost == "padded":
        longest_M = np.maximum.reduceat(slot_lens.max(axis=1), starts_M)
        nseq_M = np.diff(plan.offsets) * seq_lens_G2P.shape[1]
        return real / int((nseq_M * longest_M).sum())
    if cost != "packed":
        raise ValueError(f"cost must be 'padded', 'packed' or 'thd', got {cost!r}")
    if seq_length is None or seq_length < 1:
        raise ValueError(f"cost='packed' needs seq_length >= 1, got {seq_length}")
    if int(slot_lens.max()) > seq_length:
        raise ValueError(f"a sequence of {int(slot_lens.max())} tokens does not fit a row of seq_length={seq_length}")
    processed = 0
    for lo, hi in zip(plan.offsets[:-1].tolist(), plan.offsets[1:].tolist()):
        rows, width = packed_shape(slot_lens[lo:hi].ravel().tolist(), seq_length)
        processed += rows * width
    return real / processed
