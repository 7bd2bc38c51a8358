"""The micro-batch planner: C++ (megatron_amopo._planner) against the pure-Python reference, the
row rule, plan invariants, input validation and GIL release.

Shapes: G groups, P pairs per group (2P sequences), S positions per row.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_amopo.data.packing import pack_rows, packed_rows, packed_shape
from megatron_amopo.data.planner import (
    MicrobatchPlan,
    default_num_threads,
    load_extension,
    padding_efficiency,
    plan_microbatches,
)
from megatron_amopo.testing import planner_reference

_planner = load_extension()  # a missing build must fail this file loudly

BACKENDS = pytest.mark.parametrize("backend", [None, planner_reference], ids=["cpp", "reference"])


@st.composite
def planner_inputs(draw):
    """Consistent random lengths and planner settings: fixed k (any cost) or a padded, packed or
    THD token budget, equally often. Returns (max_len_G, total_len_G, kw); a packed token budget
    puts seq_lens [G, 2P] and seq_length into kw."""
    spg = draw(st.sampled_from([2, 4, 6, 8]))
    G = draw(st.integers(1, 300))
    seq_length = draw(st.integers(8, 200))
    # numpy draws from a hypothesis-chosen seed: long lists of drawn integers are slow to build
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    low = draw(st.sampled_from([1, seq_length // 2, seq_length]))  # all short .. all full rows
    seq_lens_G2P = rng.integers(low, seq_length + 1, size=(G, spg), dtype=np.int64)
    max_len_G, total_len_G = seq_lens_G2P.max(axis=1), seq_lens_G2P.sum(axis=1)
    mode = draw(st.sampled_from(["k", "padded", "packed", "thd"]))
    kw = dict(
        seqs_per_group=spg,
        num_epochs=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**64 - 1)),
        dp_size=draw(st.integers(1, 5)),
        window=draw(st.sampled_from([1, 2, 7, 64, 1000])),
        cost=draw(st.sampled_from(["padded", "packed", "thd"])) if mode == "k" else mode,
    )
    if mode == "k":
        kw["groups_per_microbatch"] = draw(st.integers(1, 9))
    elif mode == "packed":
        alone = max(np.prod(packed_shape(row, seq_length)) for row in seq_lens_G2P)
        kw["token_budget"] = int(alone) + draw(st.integers(0, 12 * seq_length))
        kw.update(seq_lens=seq_lens_G2P, seq_length=seq_length)
    elif mode == "thd":  # from one group alone to several groups' tokens
        kw["token_budget"] = int(total_len_G.max()) + draw(st.integers(0, 4 * spg * seq_length))
    else:
        kw["token_budget"] = int(spg * max_len_G.max()) + draw(st.integers(0, 3000))
    return max_len_G, total_len_G, kw


def all_ranks(max_len_G, total_len_G, **kw):
    return [plan_microbatches(max_len_G, total_len_G, dp_rank=r, **kw) for r in range(kw["dp_size"])]


def microbatches(plan: MicrobatchPlan):
    return [plan.microbatch(m).tolist() for m in range(plan.num_microbatches)]


def assert_same_plan(a: MicrobatchPlan, b: MicrobatchPlan):
    for field in ("offsets", "group_ids", "epochs"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype == np.int64, field
        np.testing.assert_array_equal(x, y, err_msg=field)
    assert a.dropped_groups == b.dropped_groups


@settings(max_examples=240, deadline=None)
@given(planner_inputs(), st.data())
def test_cpp_plan_equals_python_reference(inputs, data):
    """Every mode, DP size, rank, epoch count, window and thread count: the C++ (lower bounds and
    bisections the reference does not use) gives the reference's plan."""
    max_len_G, total_len_G, kw = inputs
    rank = data.draw(st.integers(0, kw["dp_size"] - 1))
    cpp = plan_microbatches(max_len_G, total_len_G, dp_rank=rank, num_threads=data.draw(st.integers(1, 4)), **kw)
    assert_same_plan(cpp, plan_microbatches(max_len_G, total_len_G, dp_rank=rank, backend=planner_reference, **kw))


@pytest.mark.parametrize("cost", ["packed", "thd"])
def test_window_plans_are_the_same_for_any_thread_count(cost):
    """Windows are planned on several threads (more than windows, too), each writing its own
    windows' slots: every count gives the reference's plan."""
    seq_lens_G2P = np.random.default_rng(5).integers(1, 121, size=(400, 6)).astype(np.int64)
    kw = dict(
        seq_lens=seq_lens_G2P,
        seqs_per_group=6,
        num_epochs=2,
        seed=11,
        dp_rank=1,
        dp_size=2,
        token_budget=6 * 120 * 3,
        cost=cost,
        seq_length=120,
        window=16,
    )
    lens = dict(max_len=seq_lens_G2P.max(axis=1), total_len=seq_lens_G2P.sum(axis=1))
    ref = plan_microbatches(**lens, **kw, backend=planner_reference)
    assert ref.num_microbatches > 20
    for threads in (1, 2, 3, 8, 64):
        assert_same_plan(plan_microbatches(**lens, **kw, num_threads=threads), ref)


def test_fixed_k_sorts_windows_by_total_len_for_packed_and_thd():
    seq_lens_G2P = np.random.default_rng(6).integers(1, 121, size=(700, 6)).astype(np.int64)
    max_len_G, total_len_G = seq_lens_G2P.max(axis=1), seq_lens_G2P.sum(axis=1)
    kw = dict(seqs_per_group=6, num_epochs=2, seed=11, dp_rank=1, dp_size=2, groups_per_microbatch=4)
    thd = plan_microbatches(max_len_G, total_len_G, cost="thd", **kw)
    assert_same_plan(thd, plan_microbatches(max_len_G, total_len_G, cost="packed", **kw))
    assert not np.array_equal(thd.group_ids, plan_microbatches(max_len_G, total_len_G, **kw).group_ids)


@BACKENDS
def test_thd_budget_is_first_fit_decreasing_inside_a_window(backend):
    """totals 9, 7, 6, 4, 3, 1 in one window, budget 10: each micro-batch starts with the largest
    remaining group and takes the largest ones that still fit: {9, 1} {7, 3} {6, 4}, all full
    (a run along the sorted window would give {1, 3, 4} {6} {7} {9})."""
    total_len_G = np.array([4, 9, 1, 6, 3, 7], np.int64)
    kw = dict(
        seqs_per_group=2,
        num_epochs=1,
        seed=3,
        dp_rank=0,
        dp_size=1,
        token_budget=10,
        cost="thd",
        window=8,
        backend=backend,
    )
    plan = plan_microbatches((total_len_G + 1) // 2, total_len_G, **kw)
    got = sorted(sorted(total_len_G[mb].tolist()) for mb in microbatches(plan))
    assert got == [[1, 9], [3, 7], [4, 6]]
    # window=2 cuts the shuffled order in pairs: micro-batches never cross a window.
    pairs = plan_microbatches((total_len_G + 1) // 2, total_len_G, **{**kw, "window": 2})
    shuffled = list(range(6))
    planner_reference.shuffle(shuffled, planner_reference.SplitMix64(3, 0, planner_reference.STREAM_GROUPS))
    windows = [set(shuffled[i : i + 2]) for i in (0, 2, 4)]
    assert all(any(set(mb) <= w for w in windows) for mb in microbatches(pairs))


@settings(max_examples=50, deadline=None)
@given(planner_inputs())
def test_each_group_at_most_once_per_epoch_and_drops_are_counted(inputs):
    max_len_G, total_len_G, kw = inputs
    G, dp = len(max_len_G), kw["dp_size"]
    plans = all_ranks(max_len_G, total_len_G, **kw)
    assert len({p.dropped_groups for p in plans}) == 1  # every rank reports the same count
    missing = 0
    for e in range(kw["num_epochs"]):
        counts = [int((p.epochs == e).sum()) for p in plans]
        assert len(set(counts)) == 1, f"ranks got different micro-batch counts {counts}"
        ids = np.concatenate(
            [
                p.group_ids[p.offsets[:-1][p.epochs == e][0] : p.offsets[1:][p.epochs == e][-1]]
                if counts[0]
                else np.zeros(0, np.int64)
                for p in plans
            ]
        )
        assert len(ids) == len(set(ids.tolist())), "a group appears twice in one epoch"
        missing += G - len(ids)
    assert missing == plans[0].dropped_groups
    k = kw.get("groups_per_microbatch")
    if k is not None:  # fixed k: short tail (< k) plus the incomplete DP round (< dp runs)
        assert all(np.all(np.diff(p.offsets) == k) for p in plans)
        assert missing == kw["num_epochs"] * (G % k + (G // k) % dp * k)


@settings(max_examples=40, deadline=None)
@given(planner_inputs())
def test_dp_split_is_a_strided_slice_of_the_single_rank_plan(inputs):
    """Steps 1-3 do not depend on dp: rank r gets micro-batches r, r+dp, ... of the
    dp=1 list of each epoch, cut to whole rounds of dp (step 4)."""
    max_len_G, total_len_G, kw = inputs
    dp = kw.pop("dp_size")
    full = plan_microbatches(max_len_G, total_len_G, dp_rank=0, dp_size=1, **kw)
    assert full.dropped_groups == (
        len(max_len_G) % kw["groups_per_microbatch"] * kw["num_epochs"] if "groups_per_microbatch" in kw else 0
    )
    for r in range(dp):
        part = plan_microbatches(max_len_G, total_len_G, dp_rank=r, dp_size=dp, **kw)
        want = []
        for e in range(kw["num_epochs"]):
            mbs = [mb for mb, ep in zip(microbatches(full), full.epochs) if ep == e]
            want += mbs[r : len(mbs) - len(mbs) % dp : dp]
        assert microbatches(part) == want


@settings(max_examples=40, deadline=None)
@given(planner_inputs())
def test_every_microbatch_respects_the_token_budget(inputs):
    """padded: 2P * groups * longest <= budget; packed: the builder's rows * width <= budget;
    thd: the micro-batch's real tokens (its THD stream) <= budget."""
    max_len_G, total_len_G, kw = inputs
    if "token_budget" not in kw:
        kw.pop("groups_per_microbatch")
        kw["token_budget"] = int(kw["seqs_per_group"] * max_len_G.max()) + 100
        kw["cost"] = "padded"
    for plan in all_ranks(max_len_G, total_len_G, **kw):
        assert plan.num_microbatches == len(plan.epochs) == len(plan.offsets) - 1
        for mb in microbatches(plan):
            if kw["cost"] == "packed":
                S = kw["seq_length"]
                lens = kw["seq_lens"][mb].ravel().tolist()  # sequence n = b * 2P + j, as built
                rows = pack_rows(lens, S)
                assert sorted(n for r in rows for n in r) == list(range(len(lens)))
                width = max(sum(lens[n] for n in r) for r in rows)
                assert width <= S and (len(rows), width) == packed_shape(lens, S)
                cost = len(rows) * width
            elif kw["cost"] == "thd":
                cost = int(total_len_G[mb].sum())
            else:
                cost = kw["seqs_per_group"] * len(mb) * int(max_len_G[mb].max())
            assert len(mb) >= 1 and cost <= kw["token_budget"]


def _candidates(lens: list[int], S: int) -> list[tuple[int, int]]:
    """The ROW RULE's candidates written out naively: best fit decreasing over explicit rows,
    then longest-processing-time into R rows, R = ceil(sum / S) .. best fit's rows."""
    free: list[int] = []
    for n in sorted(lens, reverse=True):
        fits = [r for r in range(len(free)) if free[r] >= n]
        if fits:
            free[min(fits, key=lambda r: free[r])] -= n
        else:
            free.append(S - n)
    out = [(len(free), S - min(free))]
    for R in range(-(-sum(lens) // S), len(free) + 1):
        load = [0] * R
        for n in sorted(lens, reverse=True):
            load[load.index(min(load))] += n
        if max(load) <= S:
            out.append((R, max(load)))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.data())
def test_row_rule_is_the_same_everywhere(seq_length, data):
    """pack_rows (the builder), packed_shape, the C++ and the reference agree; the shape is the first of the rule's
    candidates with the least R * W, never more than rows of exactly S, and within the bound the
    wrapper's budget check relies on: R * W <= S * min(n, ceil(2 * sum / S))."""
    S = seq_length
    lens = data.draw(st.lists(st.integers(1, S), min_size=1, max_size=80))
    rows = pack_rows(lens, S)
    assert sorted(n for r in rows for n in r) == list(range(len(lens)))
    width = max(sum(lens[n] for n in r) for r in rows)
    assert width <= S
    want = (len(rows), width)
    assert packed_shape(lens, S) == want and packed_rows(np.array(lens), S) == want[0]
    for backend in (_planner, planner_reference):
        assert backend.packed_shapes(np.array([lens, lens[::-1]], np.int64), S).tolist() == [list(want)] * 2
    cands = _candidates(lens, S)
    assert want[0] * want[1] == min(r * w for r, w in cands) <= cands[0][0] * S
    assert want == next(c for c in cands if c[0] * c[1] == want[0] * want[1])  # first of the least
    assert want[0] * want[1] <= S * min(len(lens), -(-2 * sum(lens) // S))


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 120), st.data())
def test_planner_fit_test_agrees_with_the_row_rule(seq_length, data):
    """The C++ planner's fit test (lower bounds first, the ROW RULE only where they allow it)
    says yes exactly when the rule's R * W is within the budget. Lengths at S/2, S/3 and S/4
    (and one above) sit on the bounds' thresholds."""
    S = seq_length
    edges = sorted(
        {max(1, min(S, v)) for v in (1, S // 4, S // 4 + 1, S // 3, S // 3 + 1, S // 2, S // 2 + 1, S - 1, S)}
    )
    lens = data.draw(st.lists(st.one_of(st.integers(1, S), st.sampled_from(edges)), min_size=1, max_size=70))
    rows, width = packed_shape(lens, S)
    cost = rows * width
    budgets = {cost - 1, cost, cost + 1, sum(lens), data.draw(st.integers(1, 2 * cost))} - {0}
    for budget in sorted(budgets):
        assert _planner.packed_fits(np.array(lens, np.int64), S, budget) == (cost <= budget), budget


def test_pack_rows_by_hand():
    # best fit decreasing, rows of 8: 6 -> row 0 (free 2); 5 -> row 1 (3); 4 -> row 2 (4); 3 -> row 1
    # (3 free, not row 2's 4); 2 -> row 0: 3 rows of 8 = 24. Longest-processing-time into 3 rows:
    # 6, 5, 4 open them; 3 -> the row of 4 (7); 2 -> the row of 5 (7): 3 rows of 7 = 21 wins.
    lens = [5, 6, 3, 4, 2]
    assert pack_rows(lens, 8) == [[1], [0, 4], [3, 2]] and packed_shape(lens, 8) == (3, 7)
    assert _planner.packed_fits(np.array(lens), 8, 21) and not _planner.packed_fits(np.array(lens), 8, 20)
    # Two sequences over S/2 never share a row: [5, 5] in rows of 8 is 2 rows of 5.
    assert not _planner.packed_fits(np.array([5, 5]), 8, 9)
    # ties: best fit's {2, 2} {2} (2 rows of 4) and LPT's 2 rows of 4 cost the same: best fit wins
    assert pack_rows([2, 2, 2], 4) == [[0, 1], [2]]
    assert packed_shape([3, 3, 3], 4) == (3, 3)  # one per row, rows of 3 (not 4)
    for fn in (pack_rows, packed_rows, packed_shape):
        with pytest.raises(ValueError, match=r"sequence lengths must be in \[1, seq_length=4\], got 5"):
            fn([3, 5], 4)
        with pytest.raises(ValueError, match="need at least one sequence length"):
            fn([], 4)


@BACKENDS
def test_packed_budget_charges_rows_times_width_of_the_whole_micro_batch(backend):
    """A = [5, 5, 4, 3] alone: 2 rows of 9 (18); B = [4, 3, 3, 3]: 2 rows of 7 (14). Together
    (30 tokens) best fit decreasing needs 4 rows of 10 ({5, 5} {4, 4} {3, 3, 3} {3}); balanced
    into 3 rows one row passes 10; into 4 rows: {5, 3} {5, 3} {4, 3} {4, 3}, 4 rows of 8 = 32.
    So A and B share a micro-batch at a budget of 32 tokens, not at 31."""
    seq_lens_G2P = np.array([[5, 5, 4, 3], [4, 3, 3, 3]], np.int64)
    assert packed_shape(seq_lens_G2P[0], 10) == (2, 9)
    assert packed_shape(seq_lens_G2P[1], 10) == (2, 7)
    assert packed_shape(seq_lens_G2P, 10) == (4, 8)
    kw = dict(
        seq_lens=seq_lens_G2P,
        seqs_per_group=4,
        num_epochs=1,
        seed=0,
        dp_rank=0,
        dp_size=1,
        cost="packed",
        seq_length=10,
        window=8,
        backend=backend,
    )
    assert sorted(microbatches(plan_microbatches(token_budget=31, **kw))) == [[0], [1]]
    assert microbatches(plan_microbatches(token_budget=32, **kw)) == [[0, 1]]  # largest first


def test_packed_budget_fills_rows_and_beats_the_summed_cost():
    """Groups of one long and one short sequence: the short ones of other groups fill the
    long ones' rows, so every full micro-batch uses all R rows with no waste."""
    seq_lens_G2P = np.array([[7, 1], [6, 2], [5, 3], [4, 4]] * 30, np.int64)
    plan = plan_microbatches(
        seq_lens=seq_lens_G2P,
        seqs_per_group=2,
        num_epochs=1,
        seed=3,
        dp_rank=0,
        dp_size=1,
        token_budget=8 * 4,
        cost="packed",
        seq_length=8,
        window=1000,
    )
    assert padding_efficiency(plan, seq_lens_G2P, cost="packed", seq_length=8) == 1.0
    assert np.all(np.diff(plan.offsets) == 4)  # 4 rows of 8 = 32 tokens = 4 groups of 8


def test_token_budget_fill_is_greedy_inside_a_sorted_window():
    """One window holding every group: micro-batches are as full as the budget allows, so
    with equal groups each holds budget // cost groups (packed: each group fills one row of
    35 exactly, 1000 // 35 = 28 rows of 35)."""
    seq_lens_G2P = np.tile(np.array([10, 10, 5, 10], np.int64), (103, 1))
    max_len_G, total_len_G = seq_lens_G2P.max(axis=1), seq_lens_G2P.sum(axis=1)
    for cost, per_group in (("padded", 4 * 10), ("packed", 35)):
        plan = plan_microbatches(
            max_len_G,
            total_len_G,
            seqs_per_group=4,
            num_epochs=1,
            seed=1,
            dp_rank=0,
            dp_size=1,
            token_budget=1000,
            cost=cost,
            window=1024,
            seq_lens=seq_lens_G2P,
            seq_length=35,
        )
        sizes = sorted(np.diff(plan.offsets).tolist())
        n = 1000 // per_group
        assert sizes == sorted([n] * (103 // n) + ([103 % n] if 103 % n else []))


def test_length_grouping_sorts_windows_and_reduces_padding():
    rng = np.random.default_rng(0)
    max_len_G = rng.integers(1, 1000, size=4096)
    kw = dict(seqs_per_group=2, num_epochs=1, seed=5, dp_rank=0, dp_size=1, groups_per_microbatch=8)
    seq_lens_G2P = np.stack([max_len_G, max_len_G], axis=1)
    eff = {
        w: padding_efficiency(plan_microbatches(max_len_G, 2 * max_len_G, window=w, **kw), seq_lens_G2P, cost="padded")
        for w in (1, 512)
    }
    assert eff[512] > 0.95 > 0.6 > eff[1]


@pytest.mark.parametrize("cost", ["padded", "thd"])
def test_plans_are_deterministic_and_depend_on_seed_and_epoch(cost):
    max_len_G = np.random.default_rng(1).integers(1, 50, size=500)
    kw = dict(seqs_per_group=4, num_epochs=2, dp_rank=1, dp_size=2, token_budget=400, window=32, cost=cost)
    a = plan_microbatches(max_len_G, 2 * max_len_G, seed=11, **kw)
    assert_same_plan(a, plan_microbatches(max_len_G, 2 * max_len_G, seed=11, **kw))
    b = plan_microbatches(max_len_G, 2 * max_len_G, seed=12, **kw)
    assert not np.array_equal(a.group_ids, b.group_ids)
    e0, e1 = (a.group_ids[a.offsets[:-1][a.epochs == e][0] :][:50] for e in (0, 1))
    assert not np.array_equal(e0, e1)


@BACKENDS
@pytest.mark.parametrize("cost", ["padded", "packed", "thd"])
def test_oversize_group_is_rejected_before_planning(backend, cost):
    seq_lens_G2P = np.array([[10, 10], [10, 10], [60, 40], [10, 10], [70, 60]], np.int64)
    max_len_G, total_len_G = seq_lens_G2P.max(axis=1), seq_lens_G2P.sum(axis=1)
    # num_epochs is so large that any planning work before the check would never end.
    with pytest.raises(ValueError) as err:
        plan_microbatches(
            max_len_G,
            total_len_G,
            seqs_per_group=2,
            num_epochs=10**12,
            seed=0,
            dp_rank=0,
            dp_size=1,
            token_budget=110,
            cost=cost,
            backend=backend,
            seq_lens=seq_lens_G2P,
            seq_length=70,
        )
    # groups proven within the budget by the bound need no layout; the others get one (C++ or Python)
    if cost == "padded":
        want = (
            "group 2 alone costs 120 tokens (padded), above token_budget=110; "
            "the minimum budget that fits every group is 140"
        )
    elif cost == "thd":  # 60 + 40 fits; 70 + 60 does not
        want = (
            "group 4 alone costs 130 tokens (thd: the sum of its sequence lengths), above "
            "token_budget=110; the minimum budget that fits every group is 130"
        )
    else:  # 60 + 40 > 70: two rows, of 60 positions (the fullest row); [70, 60]: two of 70
        want = (
            "group 2 alone costs 120 tokens (packed: 2 rows of 60 positions), above "
            "token_budget=110; the minimum budget that fits every group is 140"
        )
    assert str(err.value) == want


PACKED = dict(
    seqs_per_group=2, num_epochs=1, seed=0, dp_rank=0, dp_size=1, token_budget=64, cost="packed", seq_length=16
)


@pytest.mark.parametrize(
    "max_len, total_len, overrides, match",
    [
        ([3, 4], [5, 5], {}, r"needs seq_lens \[G, 2P\] and seq_length"),
        ([3, 4], [5, 5], {"seq_lens": [[3, 2], [4, 1]], "seq_length": None}, r"needs seq_lens"),
        (None, None, {"seq_lens": [[3, 2, 1], [4, 1, 1]]}, r"seq_lens must be \[G, seqs_per_group=2\]"),
        (
            None,
            None,
            {"seq_lens": [[3, 2], [17, 1]]},
            r"group 1: sequence lengths must be in \[1, seq_length=16\], got 17 at index 0",
        ),
        (None, None, {"seq_lens": [[3, 2], [4, 0]]}, r"group 1: .*got 0 at index 1"),
        (
            [3, 4],
            [5, 6],
            {"seq_lens": [[3, 2], [4, 1]]},
            r"group 1: seq_lens give max 4 and sum 5, but max_len=4 total_len=6",
        ),
        ([3], [5], {"seq_lens": [[3, 2], [4, 1]]}, r"seq_lens has 2 groups, max_len 1"),
        (None, None, {"seq_lens": [[3, 2]], "seq_length": 0}, r"seq_length must be in \[1, 2\^40\]"),
    ],
)
def test_packed_budget_inputs_are_checked(max_len, total_len, overrides, match):
    """One validation, in Python, for both backends."""
    kw = {**PACKED, "seq_lens": None, **overrides}
    with pytest.raises(ValueError, match=match):
        plan_microbatches(max_len, total_len, **kw)


def test_packed_fixed_k_and_padded_need_no_seq_lens():
    kw = {**GOOD, "dp_size": 1}
    for cost in ("padded", "packed"):
        assert plan_microbatches([3, 4], [5, 5], cost=cost, **kw).num_microbatches == 1


GOOD = dict(seqs_per_group=4, num_epochs=1, seed=0, dp_rank=0, dp_size=2, groups_per_microbatch=2)


@pytest.mark.parametrize(
    "max_len, total_len, overrides, error, match",
    [
        ([3, -1], [5, 5], {}, ValueError, r"group 1: lengths must be in \[1, 2\^40\], got max_len=-1"),
        ([3, 0], [5, 5], {}, ValueError, r"group 1: lengths must be in \[1, 2\^40\]"),
        ([3, 4], [5, 3], {}, ValueError, r"group 1: need max_len <= total_len <= seqs_per_group"),
        ([3, 4], [5, 17], {}, ValueError, r"total_len=17 seqs_per_group=4"),
        ([3, 4, 5], [5, 5], {}, ValueError, r"same length, got 3 and 2"),
        ([], [], {}, ValueError, r"need at least one group"),
        ([3.0, 4.0], [5, 5], {}, TypeError, r"max_len must hold integers"),
        ([[3, 4]], [[5, 5]], {}, ValueError, r"max_len must be 1-D"),
        ([3, 4], [5, 5], {"dp_rank": 2}, ValueError, r"dp_rank must be in \[0, dp_size=2\), got 2"),
        ([3, 4], [5, 5], {"dp_rank": -1}, ValueError, r"dp_rank must be in"),
        ([3, 4], [5, 5], {"dp_size": 0}, ValueError, r"dp_size must be >= 1"),
        ([3, 4], [5, 5], {"token_budget": 100}, ValueError, r"exactly one of groups_per_microbatch"),
        ([3, 4], [5, 5], {"groups_per_microbatch": None}, ValueError, r"exactly one of"),
        ([3, 4], [5, 5], {"groups_per_microbatch": 0}, ValueError, r"groups_per_microbatch must be >= 1"),
        ([3, 4], [5, 5], {"seqs_per_group": 3}, ValueError, r"even number 2P"),
        ([3, 4], [5, 5], {"num_epochs": 0}, ValueError, r"num_epochs must be >= 1"),
        ([3, 4], [5, 5], {"window": 0}, ValueError, r"window must be >= 1"),
        ([3, 4], [5, 5], {"seed": -1}, ValueError, r"seed must be in \[0, 2\^64\)"),
        ([3, 4], [5, 5], {"cost": "dense"}, ValueError, r"cost must be 'padded', 'packed' or 'thd'"),
        ([3, 4], [5, 5], {"dp_size": 2.0}, TypeError, r"integer"),
        ([3, 4], [5, 5], {"num_threads": 0}, ValueError, r"num_threads must be in \[1, 256\], got 0"),
        ([3, 4], [5, 5], {"num_threads": 257}, ValueError, r"num_threads must be in \[1, 256\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(max_len, total_len, overrides, error, match):
    kw = {**GOOD, **overrides}
    with pytest.raises(error, match=match):
        plan_microbatches(np.array(max_len), np.array(total_len), **kw)


def test_extension_checks_only_buffer_shapes():
    """The extension trusts the wrapper's values; it refuses only arrays whose shapes would make it
    read past a buffer, and numpy casts other integer arrays to C-contiguous int64."""
    ml, tl = np.array([3, 4], np.int64), np.array([5, 5], np.int64)
    args = dict(
        seq_lens=np.zeros((0, 0), np.int64),
        seq_length=0,
        seqs_per_group=4,
        num_epochs=1,
        seed=0,
        dp_rank=0,
        dp_size=1,
        groups_per_microbatch=1,
        token_budget=0,
        packed=False,
        window=8,
    )
    offsets, group_ids, epochs, dropped = _planner.plan_microbatches(
        ml.astype(np.int32), np.array([5, 0, 5, 0])[::2], **args
    )
    assert offsets.tolist() == [0, 1, 2] and sorted(group_ids.tolist()) == [0, 1]
    assert epochs.tolist() == [0, 0] and dropped == 0
    with pytest.raises(ValueError, match="max_len and total_len must be 1-D arrays of the same length"):
        _planner.plan_microbatches(ml, tl[:1], **args)
    packed = {**args, "groups_per_microbatch": 0, "token_budget": 64, "packed": True, "seq_length": 16}
    with pytest.raises(ValueError, match=r"a packed token budget needs seq_lens \[G, seqs_per_group\]"):
        _planner.plan_microbatches(ml, tl, **{**packed, "seq_lens": np.ones((2, 3), np.int64)})
    with pytest.raises(ValueError, match=r"seq_lens must be \[G, n\] with n >= 1"):
        _planner.packed_shapes(np.ones(3, np.int64), 4)
    with pytest.raises(TypeError):  # float lengths are not cast
        _planner.packed_fits(np.array([1.5]), 4, 4)


def test_missing_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron_amopo._planner", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e \.` from the repository root.*C\+\+17"):
        plan_microbatches([3], [5], **GOOD)
    # The reference stays usable without the extension; there is no silent fallback above.
    assert plan_microbatches([3, 4] * 2, [5, 5] * 2, **GOOD, backend=planner_reference).num_microbatches == 1


def _counter_progress_during(call) -> int:
    """Iterations a second Python thread completes while ``call`` runs.

    A huge switch interval stops the interpreter from handing the GIL over on its
    own, so the counter can only run while ``call`` has released the GIL.
    """
    go, count = threading.Event(), [0]

    def count_up():
        go.wait()
        for _ in range(200_000):
            count[0] += 1

    old = sys.getswitchinterval()
    thread = threading.Thread(target=count_up)
    thread.start()
    sys.setswitchinterval(30.0)
    try:
        go.set()
        call()
        progress = count[0]  # read before join(), which would release the GIL
    finally:
        sys.setswitchinterval(old)
        thread.join()
    return progress


@pytest.mark.parametrize("packed, thd", [(False, False), (True, False), (False, True)])
def test_cpp_planner_releases_the_gil(packed, thd):
    rng = np.random.default_rng(2)
    G = 10_000 if packed else 1_000_000
    seq_lens_G2P = rng.integers(1, 1000, size=(G, 4)).astype(np.int64)
    max_len_G, total_len_G = seq_lens_G2P.max(axis=1), seq_lens_G2P.sum(axis=1)
    args = dict(
        seq_lens=seq_lens_G2P,
        seq_length=1000,
        seqs_per_group=4,
        num_epochs=3,
        seed=1,
        dp_rank=0,
        dp_size=1,
        groups_per_microbatch=0,
        token_budget=16_000,
        packed=packed,
        window=512,
        thd=thd,
    )
    assert _counter_progress_during(lambda: _planner.plan_microbatches(max_len_G, total_len_G, **args)) >= 1000
    # Control: the pure-Python planner holds the GIL, and the harness sees it.
    # (Called directly: numpy calls in the wrapper may release the GIL briefly.)
    n = 300 if packed else 20_000
    ml, tl, sl = max_len_G[:n].tolist(), total_len_G[:n].tolist(), seq_lens_G2P[:n].tolist()
    args.update(seq_lens=sl)
    assert _counter_progress_during(lambda: planner_reference.plan_reference(ml, tl, **args)) == 0


def test_padding_efficiency_by_hand():
    seq_lens_G2P = np.array([[3, 1], [2, 2], [4, 4]])
    plan = MicrobatchPlan(
        offsets=np.array([0, 2, 3]), group_ids=np.array([1, 0, 2]), epochs=np.array([0, 0]), dropped_groups=0
    )
    # padded: mb0 = 4 sequences * longest 3, mb1 = 2 * 4; real = 8 + 8 tokens.
    assert padding_efficiency(plan, seq_lens_G2P, cost="padded") == pytest.approx(16 / 20)
    # packed, rows of 4, best fit decreasing: mb0 = [2, 2, 3, 1] -> {3, 1} {2, 2}; mb1 = 2 rows.
    assert padding_efficiency(plan, seq_lens_G2P, cost="packed", seq_length=4) == 1.0
    # rows of at most 5: mb0 -> {3, 2} {2, 1}, 2 rows of 5, or balanced {3, 1} {2, 2}, 2 rows
    # of 4; mb1 = 2 rows of 4 -> 16 / 16.
    assert padding_efficiency(plan, seq_lens_G2P, cost="packed", seq_length=5) == 1.0
    # a group [5, 2] in rows of at most 6: {5} {2}, 2 rows of 5 (its fullest row).
    one = MicrobatchPlan(offsets=np.array([0, 1]), group_ids=np.array([2]), epochs=np.array([0]), dropped_groups=0)
    assert padding_efficiency(one, np.array([[3, 1], [2, 2], [5, 2]]), cost="packed", seq_length=6) == pytest.approx(
        7 / 10
    )  # {5} {2}: 2 rows of 5
    with pytest.raises(ValueError, match="a sequence of 4 tokens does not fit a row of seq_length=3"):
        padding_efficiency(plan, seq_lens_G2P, cost="packed", seq_length=3)
    with pytest.raises(ValueError, match="needs seq_length"):
        padding_efficiency(plan, seq_lens_G2P, cost="packed")
    # thd: one stream of the real tokens (8 and 8); rounded up to multiples of 3: 9 + 9.
    assert padding_efficiency(plan, seq_lens_G2P, cost="thd") == 1.0
    assert padding_efficiency(plan, seq_lens_G2P, cost="thd", pad_to_multiple=3) == pytest.approx(16 / 18)
    with pytest.raises(ValueError, match="pad_to_multiple must be >= 1, got 0"):
        padding_efficiency(plan, seq_lens_G2P, cost="thd", pad_to_multiple=0)


def test_default_threads_are_shared_among_the_ranks_of_a_node(monkeypatch):
    """Unbound processes split the node's CPUs among torchrun's local ranks (at least 1 thread each)."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = default_num_threads()
    assert 1 <= alone <= 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    bound = len(os.sched_getaffinity(0)) != os.cpu_count()
    expected = alone if bound else max(1, min(os.cpu_count() // 4, 16))
    assert default_num_threads() == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * (os.cpu_count() or 1)))
    assert default_num_threads() == (alone if bound else 1)
