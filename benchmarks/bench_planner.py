#!/usr/bin/env python
"""Micro-batch planner benchmark: C++ vs the pure-Python reference, and padding efficiency.

(a) Planning time for one epoch, C++ (best of 3) against the Python reference (one run); goal
    >= 50x. Fixed k, padded budget and THD budget (cost="thd": sum of the groups' tokens): 1M
    groups, C++ alone on 10M (THD goal: about a second, like the padded budget). Packed
    budget: the Python reference runs the ROW RULE on every candidate (~3 ms per group), so it
    plans 10k groups (windows are planned independently: the cost is linear in G, the ratio is
    per group) and C++ alone plans 1M groups on 1 and --threads threads, and 10M.
(b) Padding efficiency (real tokens / tokens processed, see
    megatron_amopo.data.planner.padding_efficiency) of our plans against fixed batches of
    k = 1, 2, 4, 8 random groups padded to the batch's longest sequence (what a plain collator
    over a shuffled sampler does), all at the same micro-batch token budget 2P * seq_length * k.
    Packed: tokens processed = R * W, the [R, W] rows (W <= seq_length) that
    batch.build_micro_batch(layout="packed") builds and the planner charges (the ROW RULE).
    THD (one stream per micro-batch, data/batch.py build_micro_batch(thd=True)): tokens processed = real tokens,
    so its efficiency is 1.0 by construction (unless the builder pads the stream to a multiple, e.g.
    for sequence parallelism: then < that multiple per micro-batch); what tells how full its
    micro-batches are is the budget fill = real tokens / (micro-batches * budget), printed beside.

Lengths are real: the bundled HelpSteer2 rows (data/helpsteer2) preprocessed with the bundled
Qwen2 tokenizer by the project's own pipeline (megatron_amopo.data.preprocess, seq_length 1024,
default dimensions -> P = 4), read back as model positions by PreferenceGroupDataset. For (a)
the real groups are tiled up to 1M / 10M groups; (b) uses the real groups only, over several
epochs, because tiled copies would let length sorting pair identical groups and flatter us.

  python benchmarks/bench_planner.py                      # preprocesses into a temp dir (~35 s)
  python benchmarks/bench_planner.py --dataset DIR        # reuse a dataset of tools/preprocess_data.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from megatron_amopo.data.packing import packed_shape  # noqa: E402
from megatron_amopo.data.planner import default_num_threads, padding_efficiency, plan_microbatches  # noqa: E402
from megatron_amopo.testing import planner_reference  # noqa: E402

SEQ_LENGTH = 1024


def load_seq_lens(dataset: str | None, workers: int) -> np.ndarray:
    """[G, 2P] sequence lengths in model positions of the preprocessed HelpSteer2 groups."""
    from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
    from megatron_amopo.data.preprocess import preprocess
    from megatron_amopo.data.reader import PreferenceGroupDataset

    tmp = None
    if dataset is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-planner-")
        dataset = os.path.join(tmp.name, "helpsteer2-s1024")
        pre = PreprocessConfig(
            input=os.path.join(REPO, "data/helpsteer2/train_rows.jsonl"),
            output=dataset,
            tokenizer=os.path.join(REPO, "data/tokenizer-qwen2"),
            workers=workers,
            progress=False,
        )
        t = time.perf_counter()
        meta = preprocess(DataConfig(format="helpsteer2", seq_length=SEQ_LENGTH), PromptConfig(), pre)
        print(
            f"preprocessed {meta['counts']['rows_read']} HelpSteer2 rows -> "
            f"{meta['counts']['groups_written']} groups in {time.perf_counter() - t:.1f} s"
        )
    ds = PreferenceGroupDataset(dataset, seq_length=SEQ_LENGTH)
    seq_lens_G2P = ds.seq_lengths_GN - 1  # positions after the GPT shift, <= seq_length
    if tmp is not None:
        tmp.cleanup()
    return seq_lens_G2P


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def tiled(seq_lens_G2P: np.ndarray, G: int) -> np.ndarray:
    return np.tile(seq_lens_G2P, (-(-G // len(seq_lens_G2P)), 1))[:G]


def same_plan(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("offsets", "group_ids", "epochs"))


def bench_speed(seq_lens_G2P: np.ndarray, k: int, threads: int) -> None:
    spg = seq_lens_G2P.shape[1]
    budget = spg * SEQ_LENGTH * k
    base = dict(seqs_per_group=spg, num_epochs=1, seed=1234, dp_rank=0, dp_size=8, window=512)
    print(
        f"\n(a) planning time, one epoch, dp_size=8, window=512, budget 2P*{SEQ_LENGTH}*{k} "
        f"(2 shared CPU cores, load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'mode':<15}{'groups':>8}{'C++':>10}{'Python':>10}{'ratio':>8}{'same plan':>11}{'C++ x10 groups':>16}")
    modes = [
        (f"fixed k={k}", dict(groups_per_microbatch=k)),
        ("padded budget", dict(token_budget=budget, cost="padded")),
        ("thd budget", dict(token_budget=budget, cost="thd")),
    ]
    for name, mode in modes:
        row = []
        for n in (1_000_000, 10_000_000):
            lens = tiled(seq_lens_G2P, n)
            data = dict(max_len=lens.max(axis=1), total_len=lens.sum(axis=1))
            t_cpp, cpp = best_time(lambda: plan_microbatches(**data, **base, **mode), 3)
            row.append(t_cpp)
            if n == 1_000_000:
                t_py, ref = best_time(lambda: plan_microbatches(**data, **base, **mode, backend=planner_reference), 1)
                row += [t_py, t_py / t_cpp, same_plan(cpp, ref)]
        t1, tp, ratio, same, t10 = row
        print(f"{name:<15}{1_000_000:>8}{t1 * 1e3:>8.0f}ms{tp:>9.2f}s{ratio:>7.0f}x{str(same):>11}{t10 * 1e3:>14.0f}ms")
    print("Python on 10x the groups is not run; its ratio at the smaller size stands for it.")
    bench_packed_speed(seq_lens_G2P, base, budget, threads)


def bench_packed_speed(seq_lens_G2P: np.ndarray, base: dict, budget: int, threads: int) -> None:
    """Packed budget: the Python reference runs the ROW RULE on every candidate (~3 ms per group),
    so it plans 10k groups; windows are planned independently, so the cost is linear in G and the
    ratio is taken per group. C++ on 1M groups with 1 and `threads` threads, and on 10M."""
    mode = dict(token_budget=budget, cost="packed", seq_length=SEQ_LENGTH)
    small = tiled(seq_lens_G2P, 10_000)
    t_py, ref = best_time(lambda: plan_microbatches(seq_lens=small, **base, **mode, backend=planner_reference), 1)
    same = same_plan(ref, plan_microbatches(seq_lens=small, **base, **mode, num_threads=threads))
    print(
        f"\npacked budget: Python reference on 10000 groups {t_py:.1f} s ({t_py / 1e4 * 1e6:.0f} us per "
        f"group); C++ plan identical on them (any thread count): {same}"
    )
    print(f"{'groups':>10}{'threads':>9}{'C++':>10}{'us/group':>10}{'ratio':>8}")
    for n, thread_counts in ((1_000_000, sorted({1, threads})), (10_000_000, [threads])):
        lens = tiled(seq_lens_G2P, n)
        for t in thread_counts:
            t_cpp, _ = best_time(lambda: plan_microbatches(seq_lens=lens, **base, **mode, num_threads=t), 1)
            print(f"{n:>10}{t:>9}{t_cpp:>9.2f}s{t_cpp / n * 1e6:>10.2f}{t_py / 1e4 / (t_cpp / n):>7.0f}x", flush=True)
        lens = None  # free the larger array before the next size


def bench_efficiency(seq_lens_G2P: np.ndarray, epochs: int) -> None:
    G, spg = seq_lens_G2P.shape
    max_len_G, total_len_G = seq_lens_G2P.max(axis=1), seq_lens_G2P.sum(axis=1)
    base = dict(seqs_per_group=spg, num_epochs=epochs, seed=7, dp_rank=0, dp_size=1)
    print(
        f"\n(b) padding efficiency = real tokens / tokens processed, {G} real groups x {epochs} "
        f"epochs, 2P={spg}, seq_length={SEQ_LENGTH}, budget = 2P*{SEQ_LENGTH}*k"
    )
    print(
        f"{'k':>3}{'random k (collator)':>21}{'sorted k':>10}{'padded budget':>15}"
        f"{'packed budget':>15}{'groups/mb padded':>18}{'packed':>8}{'max R*W/budget':>16}"
        f"{'thd budget':>12}{'thd fill':>10}{'groups/mb thd':>15}"
    )
    pad8 = []
    for k in (1, 2, 4, 8):
        budget = spg * SEQ_LENGTH * k
        plans = {
            "random": plan_microbatches(max_len_G, total_len_G, **base, groups_per_microbatch=k, window=1),
            "sorted": plan_microbatches(max_len_G, total_len_G, **base, groups_per_microbatch=k),
            "padded": plan_microbatches(max_len_G, total_len_G, **base, token_budget=budget),
            "packed": plan_microbatches(
                seq_lens=seq_lens_G2P, **base, token_budget=budget, cost="packed", seq_length=SEQ_LENGTH
            ),
            "thd": plan_microbatches(max_len_G, total_len_G, **base, token_budget=budget, cost="thd"),
        }
        eff = {
            name: padding_efficiency(
                p, seq_lens_G2P, cost=name if name in ("packed", "thd") else "padded", seq_length=SEQ_LENGTH
            )
            for name, p in plans.items()
        }
        thd = plans["thd"]
        pad8.append(padding_efficiency(thd, seq_lens_G2P, cost="thd", pad_to_multiple=8))
        fill = int(total_len_G[thd.group_ids].sum()) / (thd.num_microbatches * budget)
        per_mb = {
            name: len(plans[name].group_ids) / plans[name].num_microbatches for name in ("padded", "packed", "thd")
        }
        packed = plans["packed"]
        most = max(
            int(np.prod(packed_shape(seq_lens_G2P[packed.microbatch(m)], SEQ_LENGTH)))
            for m in range(packed.num_microbatches)
        )
        print(
            f"{k:>3}{eff['random']:>21.3f}{eff['sorted']:>10.3f}{eff['padded']:>15.3f}"
            f"{eff['packed']:>15.3f}{per_mb['padded']:>18.2f}{per_mb['packed']:>8.2f}"
            f"{most / budget:>16.3f}{eff['thd']:>12.3f}{fill:>10.3f}{per_mb['thd']:>15.2f}"
        )
    print(
        "random k: window=1 (no length grouping); sorted k / budgets: window=512; packed: R rows of "
        f"W <= {SEQ_LENGTH} by the ROW RULE, tokens processed = R * W."
    )
    print(
        "thd: one THD stream of the micro-batch's real tokens, nothing padded, so its efficiency is "
        "1.0 unless the builder pads the stream to a multiple (with pad_to_multiple=8, k=1/2/4/8: "
        + "/".join(f"{e:.4f}" for e in pad8)
        + "); thd fill = real tokens / (micro-batches * budget)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        default=None,
        help="directory written by tools/preprocess_data.py "
        f"(HelpSteer2, --seq-length {SEQ_LENGTH}); default: preprocess into a temp dir",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenisation workers when preprocessing")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the efficiency plans")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_num_threads(),
        help="C++ threads for the packed budget (also timed with 1)",
    )
    args = parser.parse_args()
    seq_lens_G2P = load_seq_lens(args.dataset, args.workers)
    print(
        f"{seq_lens_G2P.shape[0]} groups of {seq_lens_G2P.shape[1]} sequences; length (positions) "
        f"p10/p50/p90/max = {np.percentile(seq_lens_G2P, [10, 50, 90]).astype(int).tolist()} "
        f"/ {int(seq_lens_G2P.max())}"
    )
    bench_speed(seq_lens_G2P, k=4, threads=args.threads)
    bench_efficiency(seq_lens_G2P, args.epochs)


if __name__ == "__main__":
    main()
