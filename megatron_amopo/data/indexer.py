"""Micro-batch plans for AMoPO groups: which groups go together, on which DP rank.

An AMoPO group (one training sample) is 2P token sequences, P = D + 1
chosen/rejected pairs; all of them must sit in the same micro-batch. The planner
runs in C++ (``csrc/group_indexer.cpp``, module ``megatron_amopo._indexer``,
built by ``pip install -e .`` with GCC or Clang: C++17 plus ``__int128``) with a
pure-Python reference of the same
algorithm in :mod:`megatron_amopo.data.indexer_ref`; both give identical plans.

Inputs per group g: ``max_len[g]`` (its longest sequence, tokens) and
``total_len[g]`` (sum of its 2P sequence lengths), e.g. ``group_max_len`` and
``group_total_len`` of ``reader.PreferenceGroupDataset`` (model positions); a
packed token budget also needs ``seq_lens[g]`` (the 2P lengths,
``group_seq_lens`` there) and ``seq_length`` S. Micro-batch cost:

* padded: (number of sequences in it) * (longest sequence in it)
  = 2P * n_groups * max(max_len) — every sequence padded to the longest;
* packed: R * W, the shape [R, W] of the rows it is laid out in, from the ROW
  RULE shared with ``batch.build_micro_batch(layout="packed")``: the sequences,
  longest first (ties: lower sequence index n = group_position * 2P + 2k +
  side first), are placed by each candidate below, and the first candidate
  with the least R * W wins; W (<= S) is its fullest row:
  (1) best fit decreasing: each into the open row with the least free space
  that still holds it (ties: lower row), else into a new row of S positions;
  R0 rows; (2) for R = ceil(sum / S) .. R0: longest-processing-time, each into
  the row with the least load (ties: lower row), kept when its fullest row is
  <= S. Sequences are never split. (``pack_rows`` gives the rows,
  ``packed_shape`` (R, W).) Rows are "at most S" positions and the tensor
  [R, W] is what the model processes: lengths [5, 6, 3, 4, 2] with S = 8 are
  3 rows of 7 (21 tokens), not best fit's 3 rows of 8;
* thd: sum(total_len) of its groups — the micro-batch goes to the model as
  one THD stream (``training/packed.py`` ``to_thd``: Transformer Engine, or
  variable-length flash attention), its sequences end to end with no padding,
  so the tokens processed are exactly its real tokens (plus fewer than
  ``pad_to_multiple`` positions when the stream is rounded up, e.g. for
  sequence parallelism).

Algorithm, for each epoch e = 0 .. num_epochs - 1:

1. Shuffle the group ids 0..G-1 by Fisher-Yates from the back (i = G-1 .. 1,
   j = floor(draw * (i + 1) / 2^64), Lemire's multiply-shift) with a splitmix64
   stream keyed by (seed, e, stream 0):
   ``s = f(seed + C); s = f((s ^ e) + C); state = f((s ^ stream) + C)``, each
   draw ``state += C; return f(state)``, where f is the splitmix64 output
   function, C = 0x9E3779B97F4A7C15 and all arithmetic is modulo 2^64. We use
   our own PRNG so that C++ and Python draw the same numbers.
2. Cut the shuffled order into windows of ``window`` consecutive groups (the
   last one may be shorter) and stable-sort each window by the length key:
   max_len for cost="padded", total_len for cost="packed" and "thd"
   (ascending), but total_len DEScending for a packed or THD token budget.
   Then form micro-batches:
   fixed k -> consecutive runs of k groups along the concatenated windows; a
   short last run of the epoch is DROPPED so every micro-batch has exactly k
   groups (Megatron's fixed micro-batch size); padded token budget -> along
   the concatenated windows (a micro-batch may straddle a window boundary),
   append the next group while the micro-batch cost stays <= token_budget,
   else start a new micro-batch; the last, possibly light, one is kept.
   Packed token budget (first-fit by groups inside one window, largest first):
   a micro-batch starts with the window's largest remaining group, then scans
   the window's remaining groups in order and takes each one whose total_len
   fits the free tokens (token_budget - tokens taken so far) and with which
   the micro-batch's R * W under the ROW RULE stays <= token_budget. Taken
   groups leave the window; the next micro-batch starts; a micro-batch never
   crosses a window. THD token budget: the same first-fit decreasing by
   groups with the sum of total_len as the only test (a micro-batch starts
   with the window's largest remaining group and takes, in order, each
   remaining one whose total_len fits the free tokens), so short groups fill
   what the long ones leave (HelpSteer2, Qwen2 tokens, budgets of 1/2/4/8
   groups of 2P * 1024: real tokens / (micro-batches * budget) = 0.96 / 0.99 /
   1.00 / 1.00, against 0.77 / 0.85 / 0.93 / 0.96 for the padded budget's run
   along the windows sorted ascending); fixed k plans as for cost="packed".
   A group that alone exceeds the budget (padded: 2P * max_len, packed: its
   R * W, thd: its total_len) is a ValueError raised before any planning.
3. Shuffle the epoch's micro-batches with the stream (seed, e, 1) so lengths
   do not trend within the epoch.
4. Micro-batch j of the shuffled list goes to DP rank j % dp_size; the last
   Me % dp_size micro-batches (fewer than one full round) are DROPPED so every
   rank gets the same number per epoch.

``window`` trades randomness for padding: within a window, groups of similar
length end up together (less padding); a larger window sorts more globally but
makes micro-batch membership less random; window=1 disables length grouping
(random batches, as a plain collator over a shuffled sampler gives); the
default 512 is several micro-batches' worth of groups for k <= 16.

Why packed budgets cost what they cost: a row's waste is what the packing
cannot fill up to the micro-batch's width W. Sequences longer than S/2 each
need their own row, so with rows of exactly S a micro-batch is efficient only
if it also holds short sequences that fit their gaps; rows of W <= S balanced
by longest-processing-time shrink the gaps instead (on HelpSteer2, Qwen2
tokens, S = 1024, 2P = 8, 47% of sequences are longer than S/2, and rows of
exactly S cap a budget of 8 rows at ~0.93). Taking the largest group first and
then the largest ones that still fit (a first-fit decreasing over groups) lets
the short groups of the window fill the gaps. The C++ rejects most candidates
without running the ROW RULE, by lower bounds that every packing into R rows of
at most min(S, budget / R) positions obeys, hence every candidate of the rule
(W >= the longest; R * W >= tokens; R >= the sequences longer than S/2 plus
half those in (S/3, S/2] beyond them; two of the R + 1 and three of the 2R + 1
longest share a row; Martello and Toth's bin-packing bound L2); on HelpSteer2
(S = 1024, budgets of 1-8 full groups) they leave the rule 1.5-3 runs per group
instead of 7-11 with the first four bounds alone. The Python
reference runs the rule on every candidate, so the two agree only if the bounds
are right (tests compare them, and ``_indexer.packed_fits`` with
``packed_shape``). For a THD budget, as total_len is non-increasing along the
window, the next group taken is the first remaining one at or after the first
position whose total_len fits: the C++ finds it by a bisection and a
union-find jump over taken positions (O(log window) per group), where the
reference rescans the window. Windows are planned independently, so the C++
plans packed and THD budgets on ``num_threads`` threads, each writing its
windows' own slots: the same plan for any thread count.

Guarantee: within one epoch each group appears at most once across all ranks,
and exactly once unless it is in a dropped micro-batch (step 4: < dp_size
micro-batches) or a dropped short run (step 2, fixed k: < k groups).
``MicrobatchPlan.dropped_groups`` counts both, over all epochs (same on every
rank). Plans are deterministic for a given seed and independent of dp_rank
except for which share is returned.

Shape legend: G groups, S = 2P sequences per group, M micro-batches of this
rank (all epochs), N group slots of this rank (= offsets[-1]).
"""

from __future__ import annotations

import dataclasses
import importlib
import operator
import os
from types import ModuleType
from typing import Literal, Optional

import numpy as np

from megatron_amopo.data import indexer_ref

_MAX_LENGTH = 1 << 40  # keeps every cost inside int64 in the C++ (see check_lengths there)
_MAX_SEQS_PER_GROUP = 1 << 20
_MAX_BUDGET = 1 << 62
_MAX_THREADS = 256  # kMaxThreads in the C++
_DEFAULT_THREADS_CAP = 16  # windows are short; more threads mostly wait on memory
pack_rows = indexer_ref.pack_rows  # the packed layout's rows; batch.build_micro_batch uses it

_BUILD_HINT = (
    "the C++ extension megatron_amopo._indexer is not built; run `pip install -e .` from the "
    "repository root (needs a C++17 compiler and pybind11), or pass backend='python' to use "
    "the slow reference planner"
)


@dataclasses.dataclass(frozen=True)
class MicrobatchPlan:
    """One DP rank's micro-batches; micro-batch m is group_ids[offsets[m]:offsets[m+1]]."""

    offsets: np.ndarray
    """int64 [M + 1], offsets[0] == 0."""
    group_ids: np.ndarray
    """int64 [N], group ids, micro-batch after micro-batch, epoch after epoch."""
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
        return importlib.import_module("megatron_amopo._indexer")
    except ImportError as err:
        raise ImportError(_BUILD_HINT) from err


def _as_lengths(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per group), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers (token counts), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_scalars(*, seqs_per_group, num_epochs, seed, dp_rank, dp_size, k, budget, window):
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
        raise ValueError("give exactly one of groups_per_microbatch or token_budget "
                         f"(got groups_per_microbatch={k}, token_budget={budget})")
    if k is not None and k < 1:
        raise ValueError(f"groups_per_microbatch must be >= 1, got {k}")
    if budget is not None and not 1 <= budget <= _MAX_BUDGET:
        raise ValueError(f"token_budget must be in [1, 2^62], got {budget}")


def _as_seq_lens(seq_lens, max_len, total_len, seqs_per_group: int):
    """[G, 2P] int64 lengths; max_len/total_len derived from them when not given."""
    seq_lens_GS = np.asarray(seq_lens)
    if seq_lens_GS.ndim != 2 or seq_lens_GS.shape[1] != seqs_per_group:
        raise ValueError(f"seq_lens must be [G, seqs_per_group={seqs_per_group}], got shape "
                         f"{seq_lens_GS.shape}")
    if seq_lens_GS.size and not np.issubdtype(seq_lens_GS.dtype, np.integer):
        raise TypeError(f"seq_lens must hold integers (token counts), got dtype {seq_lens_GS.dtype}")
    seq_lens_GS = np.ascontiguousarray(seq_lens_GS, dtype=np.int64)
    if max_len is None:
        max_len = seq_lens_GS.max(axis=1) if len(seq_lens_GS) else np.zeros(0, np.int64)
    if total_len is None:
        total_len = seq_lens_GS.sum(axis=1)
    return seq_lens_GS, max_len, total_len


def _check_seq_lens(seq_lens_GS, max_len_G, total_len_G, *, seq_length, budget) -> None:
    """Packed token budget; same checks, order and messages as check_seq_lens in the C++."""
    bad_GS = (seq_lens_GS < 1) | (seq_lens_GS > seq_length)
    mismatch_G = (seq_lens_GS.max(axis=1) != max_len_G) | (seq_lens_GS.sum(axis=1) != total_len_G)
    bad = np.flatnonzero(bad_GS.any(axis=1) | mismatch_G)
    if bad.size:
        g = int(bad[0])
        if bad_GS[g].any():
            j = int(np.flatnonzero(bad_GS[g])[0])
            raise ValueError(f"group {g}: sequence lengths must be in [1, seq_length={seq_length}], "
                             f"got {int(seq_lens_GS[g, j])} at index {j}")
        raise ValueError(f"group {g}: seq_lens give max {int(seq_lens_GS[g].max())} and sum "
                         f"{int(seq_lens_GS[g].sum())}, but max_len={int(max_len_G[g])} "
                         f"total_len={int(total_len_G[g])}")
    shape_G2 = np.array([indexer_ref.packed_shape(row, seq_length) for row in seq_lens_GS.tolist()],
                        np.int64)
    _refuse_over_budget(shape_G2[:, 0] * shape_G2[:, 1], budget,
                        lambda g: f"packed: {int(shape_G2[g, 0])} rows of {int(shape_G2[g, 1])} positions")


def _refuse_over_budget(cost_G, budget: int, describe) -> None:
    """ValueError for the first group whose cost alone is above the budget (``describe(g)``: how
    its cost is counted); same message as the C++."""
    over = np.flatnonzero(cost_G > budget)
    if over.size:
        g = int(over[0])
        raise ValueError(f"group {g} alone costs {int(cost_G[g])} tokens ({describe(g)}), above "
                         f"token_budget={budget}; the minimum budget that fits every group "
                         f"is {int(cost_G.max())}")


def _check_lengths(max_len_G, total_len_G, *, seqs_per_group, budget, cost) -> None:
    """Same checks, order and messages as check_lengths in csrc/group_indexer.cpp."""
    if len(max_len_G) != len(total_len_G):
        raise ValueError("max_len and total_len must have the same length, got "
                         f"{len(max_len_G)} and {len(total_len_G)}")
    if len(max_len_G) == 0:
        raise ValueError("need at least one group, got 0")
    out_of_range_G = (max_len_G < 1) | (max_len_G > _MAX_LENGTH) | (total_len_G < 1) | (
        total_len_G > _MAX_LENGTH)
    inconsistent_G = (total_len_G < max_len_G) | (total_len_G > seqs_per_group * max_len_G)
    bad = np.flatnonzero(out_of_range_G | inconsistent_G)
    if bad.size:
        g = int(bad[0])
        ml, tl = int(max_len_G[g]), int(total_len_G[g])
        if out_of_range_G[g]:
            raise ValueError(f"group {g}: lengths must be in [1, 2^40], got max_len={ml} total_len={tl}")
        raise ValueError(f"group {g}: need max_len <= total_len <= seqs_per_group * max_len, got "
                         f"max_len={ml} total_len={tl} seqs_per_group={seqs_per_group}")
    if budget is not None and cost in ("padded", "thd"):
        cost_G = seqs_per_group * max_len_G if cost == "padded" else total_len_G
        what = "padded" if cost == "padded" else "thd: the sum of its sequence lengths"
        _refuse_over_budget(cost_G, budget, lambda g: what)


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
    backend: Literal["cpp", "python"] = "cpp",
    num_threads: Optional[int] = None,
) -> MicrobatchPlan:
    """Plans this DP rank's micro-batches over ``num_epochs`` epochs (algorithm: module docstring).

    ``max_len``/``total_len``: int arrays [G]. Give exactly one of
    ``groups_per_microbatch`` (fixed k) or ``token_budget`` (max cost per
    micro-batch, in tokens, under ``cost``). cost="packed" with a token budget
    also needs ``seq_lens`` (int [G, seqs_per_group], model positions; max_len
    and total_len may then be left out, else they must match it) and
    ``seq_length`` (the longest row). cost="thd" charges the sum of total_len (one THD
    stream) and needs no seq_lens. backend="python" runs the slow reference;
    backend="cpp" never falls back to it. ``num_threads``: threads the C++ plans a packed
    or THD token budget's windows on (default: the CPUs this process may use, at most 16);
    the plan is the same for any number.
    """
    if backend not in ("cpp", "python"):
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
    if cost not in ("padded", "packed", "thd"):
        raise ValueError(f"cost must be 'padded', 'packed' or 'thd', got {cost!r}")
    ints = dict(seqs_per_group=seqs_per_group, num_epochs=num_epochs, seed=seed, dp_rank=dp_rank,
                dp_size=dp_size, window=window)
    ints = {name: operator.index(v) for name, v in ints.items()}  # rejects floats with TypeError
    k = None if groups_per_microbatch is None else operator.index(groups_per_microbatch)
    budget = None if token_budget is None else operator.index(token_budget)
    _check_scalars(**ints, k=k, budget=budget)
    threads = default_num_threads() if num_threads is None else operator.index(num_threads)
    if not 1 <= threads <= _MAX_THREADS:
        raise ValueError(f"num_threads must be in [1, {_MAX_THREADS}], got {threads}")
    packed_budget = cost == "packed" and budget is not None
    seq_lens_GS = np.zeros((0, 0), np.int64)
    if packed_budget:
        if seq_lens is None or seq_length is None:
            raise ValueError("cost='packed' with token_budget needs seq_lens [G, 2P] and seq_length: "
                             "packed micro-batches are charged by rows of at most seq_length positions")
        seq_length = operator.index(seq_length)
        if not 1 <= seq_length <= _MAX_LENGTH:
            raise ValueError(f"seq_length must be in [1, 2^40], got {seq_length}")
        seq_lens_GS, max_len, total_len = _as_seq_lens(seq_lens, max_len, total_len,
                                                       ints["seqs_per_group"])
    if max_len is None or total_len is None:
        raise ValueError("max_len and total_len are required unless seq_lens is given "
                         "(cost='packed' with token_budget)")
    max_len_G, total_len_G = _as_lengths("max_len", max_len), _as_lengths("total_len", total_len)
    if packed_budget and len(seq_lens_GS) != len(max_len_G):
        raise ValueError(f"seq_lens has {len(seq_lens_GS)} groups, max_len {len(max_len_G)}")
    args = dict(**ints, groups_per_microbatch=k or 0, token_budget=budget or 0,
                packed=cost == "packed", thd=cost == "thd")
    if backend == "cpp":  # the extension runs the same length checks before planning
        out = load_extension().plan_microbatches(max_len_G, total_len_G, seq_lens=seq_lens_GS,
                                                 seq_length=seq_length or 0, num_threads=threads,
                                                 **args)
    else:
        _check_lengths(max_len_G, total_len_G, seqs_per_group=ints["seqs_per_group"],
                       budget=budget, cost=cost)
        if packed_budget:
            _check_seq_lens(seq_lens_GS, max_len_G, total_len_G, seq_length=seq_length, budget=budget)
        out = indexer_ref.plan_reference(max_len_G.tolist(), total_len_G.tolist(), **args,
                                         seq_lens=seq_lens_GS.tolist(), seq_length=seq_length or 0)
    offsets, group_ids, epochs, dropped = out
    return MicrobatchPlan(
        offsets=np.asarray(offsets, dtype=np.int64),
        group_ids=np.asarray(group_ids, dtype=np.int64),
        epochs=np.asarray(epochs, dtype=np.int64),
        dropped_groups=int(dropped),
    )


def packed_shape(seq_lens, seq_length: int) -> tuple[int, int]:
    """(rows R, width W) of the packed layout for these sequence lengths (the ROW RULE of the
    module docstring; ``batch.build_micro_batch(layout="packed")`` builds [R, W] rows)."""
    lens = [int(n) for n in np.asarray(seq_lens).ravel()]
    if not lens:
        raise ValueError("need at least one sequence length")
    if not (1 <= min(lens) and max(lens) <= seq_length):
        raise ValueError(f"sequence lengths must be in [1, seq_length={seq_length}], got "
                         f"{min(lens) if min(lens) < 1 else max(lens)}")
    return indexer_ref.packed_shape(lens, seq_length)


def packed_rows(seq_lens, seq_length: int) -> int:
    """Rows R of the packed layout (``packed_shape(...)[0]``, ``len(pack_rows(...))``)."""
    return packed_shape(seq_lens, seq_length)[0]


def padding_efficiency(
    plan: MicrobatchPlan,
    seq_lens_GS: np.ndarray,
    *,
    cost: Literal["padded", "packed", "thd"],
    seq_length: Optional[int] = None,
    pad_to_multiple: int = 1,
) -> float:
    """Real tokens / tokens processed over every micro-batch of ``plan``.

    ``seq_lens_GS``: int [G, S], the length of every sequence of every group.
    padded: a micro-batch processes (sequences in it) * (its longest sequence).
    packed: a micro-batch processes R * W, the [R, W] rows of the ROW RULE that
    ``batch.build_micro_batch(layout="packed")`` builds.
    thd: a micro-batch is one stream of its real tokens T, rounded up to a multiple of
    ``pad_to_multiple`` (``training.packed.to_thd``); 1.0 when that is 1.
    """
    seq_lens_GS = np.asarray(seq_lens_GS, dtype=np.int64)
    if seq_lens_GS.ndim != 2:
        raise ValueError(f"seq_lens_GS must be [G, S], got shape {seq_lens_GS.shape}")
    if plan.num_microbatches == 0:
        raise ValueError("the plan has no micro-batches")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    slots_NS = seq_lens_GS[plan.group_ids]
    real = int(slots_NS.sum())
    starts_M = plan.offsets[:-1]
    if cost == "thd":
        real_M = np.add.reduceat(slots_NS.sum(axis=1), starts_M)
        return real / int((-(-real_M // pad_to_multiple) * pad_to_multiple).sum())
    if cost == "padded":
        longest_M = np.maximum.reduceat(slots_NS.max(axis=1), starts_M)
        nseq_M = np.diff(plan.offsets) * seq_lens_GS.shape[1]
        return real / int((nseq_M * longest_M).sum())
    if cost != "packed":
        raise ValueError(f"cost must be 'padded', 'packed' or 'thd', got {cost!r}")
    if seq_length is None or seq_length < 1:
        raise ValueError(f"cost='packed' needs seq_length >= 1, got {seq_length}")
    if int(slots_NS.max()) > seq_length:
        raise ValueError(f"a sequence of {int(slots_NS.max())} tokens does not fit a row of "
                         f"seq_length={seq_length}")
    processed = 0
    for lo, hi in zip(plan.offsets[:-1].tolist(), plan.offsets[1:].tolist()):
        rows, width = indexer_ref.packed_shape(slots_NS[lo:hi].ravel().tolist(), seq_length)
        processed += rows * width
    return real / processed
