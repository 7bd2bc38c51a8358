#!/usr/bin/env python
"""Preprocessing throughput (input rows/s) with 1 and 2 workers on the bundled HelpSteer2 rows.

  python benchmarks/bench_preprocess.py [--seq-length 2048] [--limit N]

Both runs happen in this process, one after the other, so they share imports and machine load;
the ratio is workers=2 over workers=1. Each run's time covers tokenizer loading and writing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked

from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig  # noqa: E402
from megatron_amopo.data.preprocess import preprocess  # noqa: E402


def run(workers: int, seq_length: int, limit, out: str) -> tuple[float, dict]:
    pre = PreprocessConfig(
        input=os.path.join(ROOT, "data/helpsteer2/train_rows.jsonl"),
        output=out,
        tokenizer=os.path.join(ROOT, "data/tokenizer-qwen2"),
        workers=workers,
        limit=limit,
        overwrite=True,
        progress=False,
    )
    t0 = time.perf_counter()
    meta = preprocess(DataConfig(format="helpsteer2", seq_length=seq_length), PromptConfig(), pre)
    return time.perf_counter() - t0, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    from megatron.core.datasets import indexed_dataset  # noqa: F401  (import once, outside the timings)

    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for workers in (1, 2):
            seconds, meta = run(workers, args.seq_length, args.limit, os.path.join(tmp, f"w{workers}"))
            rows = meta["counts"]["rows_read"]
            rates[workers] = rows / seconds
            print(
                f"workers={workers}: {rows} rows, {meta['counts']['groups_written']} groups, "
                f"{meta['counts']['tokens']} tokens in {seconds:.2f} s -> {rates[workers]:.1f} rows/s"
            )
    print(f"ratio workers=2 / workers=1: {rates[2] / rates[1]:.2f}x (cpu cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
