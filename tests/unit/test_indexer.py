"""Tests of the AMoPO micro-batch planner: C++ (megatron_amopo._indexer) against
the pure-Python reference, plan invariants, input validation and GIL release.

Shape legend: G groups, S = 2P sequences per group.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_amopo.data import indexer, indexer_ref
from megatron_amopo.data.indexer import MicrobatchPlan, padding_efficiency, plan_microbatches

_indexer = indexer.load_extension()  # a missing build must fail this file loudly

BACKENDS = ("cpp", "python")


@st.composite
def planner_inputs(draw):
    """Consistent random lengths and planner settings (both budget and cost modes)."""
    spg = draw(st.sampled_from([2, 4, 6, 8]))
    G = draw(st.integers(1, 300))
    max_len_G = np.array(draw(st.lists(st.integers(1, 200), min_size=G, max_size=G)), np.int64)
    frac_G = np.array(draw(st.lists(st.floats(0, 1), min_size=G, max_size=G)))
    # max_len <= total_len <= S * max_len, as for real groups.
    total_len_G = max_len_G + np.floor(frac_G * (spg - 1) * max_len_G).astype(np.int64)
    cost = draw(st.sampled_from(["padded", "packed"]))
    kw = dict(seqs_per_group=spg, num_epochs=draw(st.integers(1, 3)),
              seed=draw(st.integers(0, 2**64 - 1)), dp_size=draw(st.integers(1, 5)),
              window=draw(st.sampled_from([1, 2, 7, 64, 1000])), cost=cost)
    if draw(st.booleans()):
        kw["groups_per_microbatch"] = draw(st.integers(1, 9))
    else:
        cost_G = total_len_G if cost == "packed" else spg * max_len_G
        kw["token_budget"] = int(cost_G.max()) + draw(st.integers(0, 3000))
    return max_len_G, total_len_G, kw


def all_ranks(max_len_G, total_len_G, backend="cpp", **kw):
    return [plan_microbatches(max_len_G, total_len_G, dp_rank=r, backend=backend, **kw)
            for r in range(kw["dp_size"])]


def microbatches(plan: MicrobatchPlan):
    return [plan.microbatch(m).tolist() for m in range(plan.num_microbatches)]


def assert_same_plan(a: MicrobatchPlan, b: MicrobatchPlan):
    for field in ("offsets", "group_ids", "epochs"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype == np.int64, field
        np.testing.assert_array_equal(x, y, err_msg=field)
    assert a.dropped_groups == b.dropped_groups


@settings(max_examples=80, deadline=None)
@given(planner_inputs(), st.data())
def test_cpp_plan_equals_python_reference(inputs, data):
    max_len_G, total_len_G, kw = inputs
    rank = data.draw(st.integers(0, kw["dp_size"] - 1))
    cpp = plan_microbatches(max_len_G, total_len_G, dp_rank=rank, backend="cpp", **kw)
    ref = plan_microbatches(max_len_G, total_len_G, dp_rank=rank, backend="python", **kw)
    assert_same_plan(cpp, ref)


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
        ids = np.concatenate([p.group_ids[p.offsets[:-1][p.epochs == e][0]:
                                          p.offsets[1:][p.epochs == e][-1]]
                              if counts[0] else np.zeros(0, np.int64) for p in plans])
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
    assert full.dropped_groups == (len(max_len_G) % kw["groups_per_microbatch"] * kw["num_epochs"]
                                   if "groups_per_microbatch" in kw else 0)
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
    max_len_G, total_len_G, kw = inputs
    if "token_budget" not in kw:
        kw.pop("groups_per_microbatch")
        kw["token_budget"] = int(kw["seqs_per_group"] * max_len_G.max()) + 100
    for plan in all_ranks(max_len_G, total_len_G, **kw):
        assert plan.num_microbatches == len(plan.epochs) == len(plan.offsets) - 1
        for mb in microbatches(plan):
            if kw["cost"] == "packed":
                cost = int(total_len_G[mb].sum())
            else:
                cost = kw["seqs_per_group"] * len(mb) * int(max_len_G[mb].max())
            assert 1 <= len(mb) and cost <= kw["token_budget"]


def test_token_budget_fill_is_greedy_inside_a_sorted_window():
    """One window holding every group: micro-batches are maximal runs of the
    length-sorted order, so with equal lengths each holds budget // cost groups."""
    max_len_G = np.full(103, 10, np.int64)
    total_len_G = np.full(103, 35, np.int64)
    for cost, per_group in (("padded", 4 * 10), ("packed", 35)):
        plan = plan_microbatches(max_len_G, total_len_G, seqs_per_group=4, num_epochs=1, seed=1,
                                 dp_rank=0, dp_size=1, token_budget=1000, cost=cost, window=1024)
        sizes = sorted(np.diff(plan.offsets).tolist())
        n = 1000 // per_group
        assert sizes == sorted([n] * (103 // n) + ([103 % n] if 103 % n else []))


def test_length_grouping_sorts_windows_and_reduces_padding():
    rng = np.random.default_rng(0)
    max_len_G = rng.integers(1, 1000, size=4096)
    kw = dict(seqs_per_group=2, num_epochs=1, seed=5, dp_rank=0, dp_size=1, groups_per_microbatch=8)
    seq_lens_GS = np.stack([max_len_G, max_len_G], axis=1)
    eff = {w: padding_efficiency(plan_microbatches(max_len_G, 2 * max_len_G, window=w, **kw),
                                 seq_lens_GS, cost="padded") for w in (1, 512)}
    assert eff[512] > 0.95 > 0.6 > eff[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_are_deterministic_and_depend_on_seed_and_epoch(backend):
    rng = np.random.default_rng(1)
    max_len_G = rng.integers(1, 50, size=500)
    kw = dict(seqs_per_group=4, num_epochs=2, dp_rank=1, dp_size=2, token_budget=400,
              window=32, backend=backend)
    a = plan_microbatches(max_len_G, 2 * max_len_G, seed=11, **kw)
    assert_same_plan(a, plan_microbatches(max_len_G, 2 * max_len_G, seed=11, **kw))
    b = plan_microbatches(max_len_G, 2 * max_len_G, seed=12, **kw)
    assert not np.array_equal(a.group_ids, b.group_ids)
    e0, e1 = (a.group_ids[a.offsets[:-1][a.epochs == e][0]:][:50] for e in (0, 1))
    assert not np.array_equal(e0, e1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cost", ["padded", "packed"])
def test_oversize_group_is_rejected_before_planning(backend, cost):
    max_len_G = np.array([10, 10, 60, 10, 70], np.int64)
    total_len_G = np.array([20, 20, 100, 20, 130], np.int64)
    # num_epochs is so large that any planning work before the check would never end.
    with pytest.raises(ValueError) as err:
        plan_microbatches(max_len_G, total_len_G, seqs_per_group=2, num_epochs=10**12, seed=0,
                          dp_rank=0, dp_size=1, token_budget=110, cost=cost, backend=backend)
    if cost == "padded":
        want = ("group 2 alone costs 120 tokens (padded), above token_budget=110; "
                "the minimum budget that fits every group is 140")
    else:
        want = ("group 4 alone costs 130 tokens (packed), above token_budget=110; "
                "the minimum budget that fits every group is 130")
    assert str(err.value) == want


GOOD = dict(seqs_per_group=4, num_epochs=1, seed=0, dp_rank=0, dp_size=2, groups_per_microbatch=2)


@pytest.mark.parametrize("backend", BACKENDS)
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
        ([3, 4], [5, 5], {"cost": "dense"}, ValueError, r"cost must be 'padded' or 'packed'"),
        ([3, 4], [5, 5], {"dp_size": 2.0}, TypeError, r"integer"),
    ],
)
def test_bad_inputs_raise_clear_errors(backend, max_len, total_len, overrides, error, match):
    kw = {**GOOD, **overrides}
    with pytest.raises(error, match=match):
        plan_microbatches(np.array(max_len), np.array(total_len), backend=backend, **kw)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match=r"backend must be 'cpp' or 'python'"):
        plan_microbatches([3], [5], **GOOD, backend="numba")


def test_extension_validates_its_own_inputs():
    """Direct callers of the extension get checked too (dtype, layout, ranges)."""
    ml, tl = np.array([3, 4], np.int64), np.array([5, 5], np.int64)
    args = dict(seqs_per_group=4, num_epochs=1, seed=0, dp_rank=0, dp_size=1,
                groups_per_microbatch=1, token_budget=0, packed=False, window=8)
    with pytest.raises(TypeError, match="max_len must have dtype int64, got int32"):
        _indexer.plan_microbatches(ml.astype(np.int32), tl, **args)
    with pytest.raises(ValueError, match="total_len must be a 1-D C-contiguous int64 array"):
        _indexer.plan_microbatches(ml, np.array([5, 0, 5, 0], np.int64)[::2], **args)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, dp_size=1\), got 1"):
        _indexer.plan_microbatches(ml, tl, **{**args, "dp_rank": 1})
    with pytest.raises(ValueError, match="exactly one of groups_per_microbatch > 0 or token_budget"):
        _indexer.plan_microbatches(ml, tl, **{**args, "token_budget": 64})
    offsets, group_ids, epochs, dropped = _indexer.plan_microbatches(ml, tl, **args)
    assert offsets.tolist() == [0, 1, 2] and sorted(group_ids.tolist()) == [0, 1]
    assert epochs.tolist() == [0, 0] and dropped == 0


def test_missing_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron_amopo._indexer", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e \.` from the repository root.*C\+\+17"):
        plan_microbatches([3], [5], **GOOD)
    # The reference stays usable without the extension; there is no silent fallback above.
    assert plan_microbatches([3, 4] * 2, [5, 5] * 2, **GOOD, backend="python").num_microbatches == 1


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


def test_cpp_planner_releases_the_gil():
    rng = np.random.default_rng(2)
    max_len_G = rng.integers(1, 1000, size=1_000_000).astype(np.int64)
    total_len_G = 4 * max_len_G
    args = dict(seqs_per_group=4, num_epochs=3, seed=1, dp_rank=0, dp_size=1,
                groups_per_microbatch=0, token_budget=16_000, packed=False, window=512)
    assert _counter_progress_during(lambda: _indexer.plan_microbatches(
        max_len_G, total_len_G, **args)) >= 1000
    # Control: the pure-Python planner holds the GIL, and the harness sees it.
    # (Called directly: numpy calls in the wrapper may release the GIL briefly.)
    ml, tl = max_len_G[:20_000].tolist(), total_len_G[:20_000].tolist()
    assert _counter_progress_during(lambda: indexer_ref.plan_reference(ml, tl, **args)) == 0


def test_first_fit_rows_by_hand():
    assert indexer.first_fit_rows([3, 2, 2, 1], 4) == 2  # 1 goes back to the first row
    assert indexer.first_fit_rows([3, 3, 3], 4) == 3
    assert indexer.first_fit_rows([1] * 9, 4) == 3


def test_padding_efficiency_by_hand():
    seq_lens_GS = np.array([[3, 1], [2, 2], [4, 4]])
    plan = MicrobatchPlan(offsets=np.array([0, 2, 3]), group_ids=np.array([1, 0, 2]),
                          epochs=np.array([0, 0]), dropped_groups=0)
    # padded: mb0 = 4 sequences * longest 3, mb1 = 2 * 4; real = 8 + 8 tokens.
    assert padding_efficiency(plan, seq_lens_GS, cost="padded") == pytest.approx(16 / 20)
    # packed, rows of 4 first-fit: mb0 = [2, 2, 3, 1] -> rows {2,2} {3,1}; mb1 = 2 rows.
    assert padding_efficiency(plan, seq_lens_GS, cost="packed", seq_length=4) == 1.0
    # rows of 5: mb0 = [2, 2 | 3 | 1 joins the first row] = 2 rows, mb1 = 2 rows -> 16 / 20.
    assert padding_efficiency(plan, seq_lens_GS, cost="packed", seq_length=5) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="a sequence of 4 tokens does not fit a row of seq_length=3"):
        padding_efficiency(plan, seq_lens_GS, cost="packed", seq_length=3)
    with pytest.raises(ValueError, match="needs seq_length"):
        padding_efficiency(plan, seq_lens_GS, cost="packed")
