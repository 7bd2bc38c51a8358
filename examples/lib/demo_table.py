"""Print the CPU demo's before/after table: held-out (tools/evaluate.py JSON) and training-set accuracy and
mean margin (the run's first and last validation rows in metrics.jsonl) per pair, then the held-out
steerability and flip rate of each dimension (mirrored held-out pairs, evaluation/report.py).

    python examples/lib/demo_table.py OUT
"""

from __future__ import annotations

import json
import os
import sys


def main(out: str) -> None:
    before = json.load(open(os.path.join(out, "heldout_before.json")))
    after = json.load(open(os.path.join(out, "heldout_after.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))]
    valid = [r for r in rows if r["kind"] == "valid"]
    t0, t1 = valid[0], valid[-1]
    pairs = [k.split("/", 1)[1] for k in t0 if k.startswith("accuracy/") and k != "accuracy/all"] + ["all"]
    print(
        f"{'pair':<14} | {'held-out accuracy':^19} | {'held-out margin':^19} | {'train accuracy':^19} | "
        f"{'train margin':^19}"
    )
    for p in pairs:
        cells = [
            f"{a[f'{m}/{p}']:8.3f} -> {b[f'{m}/{p}']:7.3f}"
            for a, b in ((before, after), (t0, t1))
            for m in ("accuracy", "margin")
        ]
        print(f"{p:<14} | " + " | ".join(cells))
    steer = [k.split("/", 1)[1] for k in before.get("bootstrap", {}) if k.startswith("steerability/")]
    for dim in steer:
        b, a = before["bootstrap"], after["bootstrap"]
        print(
            f"held-out {dim} steerability {b[f'steerability/{dim}']:+.3f} -> {a[f'steerability/{dim}']:+.3f}, "
            f"flip rate {b[f'flip_rate/{dim}']:.3f} -> {a[f'flip_rate/{dim}']:.3f} "
            f"({a[f'groups_steer/{dim}']} groups whose responses differ on {dim})"
        )
    steps = t1["iteration"]
    print(
        f"(before -> after {steps} steps; margins are beta x the difference of length-normalised log-probs, "
        f"chosen minus rejected; held-out prompts never trained on; docs/RESULTS.md has a real budget's result)"
    )


if __name__ == "__main__":
    main(sys.argv[1])
