"""Controllability measurement (megatron_amopo/evaluation/control.py): Spearman and the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_amopo.evaluation.control import average_ranks, reply_length, spearman, spearman_ci, summarize_control


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(average_ranks([10, 30, 20, 30, 5]), [2, 4.5, 3, 4.5, 1])


def test_spearman_hand_computed():
    # Without ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); d = [0, -1, 1, 0, 0] -> 1 - 12 / 120.
    assert math.isclose(spearman([1, 2, 3, 4, 5], [10, 30, 20, 40, 50]), 0.9)
    # With ties: ranks of y are [1, 2, 3.5, 5, 3.5]; Pearson of the ranks is 8 / sqrt(10 * 9.5).
    assert math.isclose(spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]), 8 / math.sqrt(95))
    x, y = [0, 0, 2, 2, 4, 4], [9, 3, 2, 1, 0, 0]
    assert math.isclose(spearman(x, y), -spearman(x, [-v for v in y]))
    assert spearman([1, 2, 3], [-1, -5, -9]) == -1.0
    assert math.isnan(spearman([0, 2, 4], [7, 7, 7]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1, 2, 3])


def test_reply_length_stops_at_the_first_stop_token():
    assert reply_length([5, 6, 2, 7, 2], {2}) == (2, False)
    assert reply_length([5, 6, 7], {2, 9}) == (3, True)
    assert reply_length([9], {2, 9}) == (0, False)


def test_summarize_control():
    replies = [
        {"score": 0.0, "length": 10, "truncated": False},
        {"score": 0.0, "length": 20, "truncated": False},
        {"score": 2.0, "length": 30, "truncated": False},
        {"score": 2.0, "length": 20, "truncated": False},
        {"score": 4.0, "length": 64, "truncated": True},
        {"score": 4.0, "length": 40, "truncated": False},
    ]
    s = summarize_control(replies, [0.0, 2.0, 4.0])
    assert s["per_score"]["0.0"] == {"mean_length": 15.0, "replies": 2, "at_max_new_tokens": 0}
    assert s["per_score"]["4.0"] == {"mean_length": 52.0, "replies": 2, "at_max_new_tokens": 1}
    assert s["num_replies"] == 6
    # ranks: scores [1.5, 1.5, 3.5, 3.5, 5.5, 5.5], lengths [1, 2.5, 4, 2.5, 6, 5]
    assert math.isclose(s["spearman_score_length"], spearman([0, 0, 2, 2, 4, 4], [10, 20, 30, 20, 64, 40]))
    assert 0.8 < s["spearman_score_length"] < 1.0


def test_prompts_whose_reply_ignores_the_requested_score():
    replies = [
        {"prompt_index": i, "score": sc, "length": len(t), "truncated": False, "text": t}
        for i, texts in enumerate([("a", "a", "a"), ("a", "bb", "a"), ("ccc", "ccc", "ccc")])
        for sc, t in zip((0.0, 2.0, 4.0), texts)
    ]
    s = summarize_control(replies, [0.0, 2.0, 4.0])
    assert s["prompts"] == 3 and s["prompts_same_reply_at_every_score"] == 2
    assert "prompts" not in summarize_control([{k: v for k, v in r.items() if k != "text"} for r in replies], [0.0])


def _replies(lengths_by_prompt):
    return [
        {"prompt_index": i, "score": sc, "length": n, "truncated": False}
        for i, lengths in enumerate(lengths_by_prompt)
        for sc, n in zip((0.0, 2.0, 4.0), lengths)
    ]


def test_spearman_interval_over_prompts():
    gen = np.random.default_rng(0)
    steered = _replies([(10 + x, 40 + x, 90 + x) for x in gen.integers(0, 20, 24)])
    s = summarize_control(steered, [0.0, 2.0, 4.0], resamples=2000)
    lo, hi = s["spearman_ci95"]
    assert 0 < lo <= s["spearman_score_length"] <= hi <= 1
    noise = _replies([tuple(gen.integers(5, 200, 3)) for _ in range(24)])
    lo, hi = spearman_ci(noise, resamples=2000)
    assert lo < 0 < hi  # no association: the interval straddles zero
    # Resampling is over prompts: one prompt's three replies always travel together, so an interval from
    # a single prompt is refused rather than computed from 3 dependent replies.
    with pytest.raises(ValueError, match="at least 2 prompts"):
        spearman_ci(_replies([(1, 2, 3)]))
    flat = _replies([(7, 7, 7)] * 5)  # rho undefined in every resample: counted as no association
    assert spearman_ci(flat, resamples=200) == (0.0, 0.0)
