"""PNG plots of a training run's metrics.jsonl: loss, per-dimension weights (with the
batch spread and the deterministic mean-mode weights), reward margins and accuracies.

    amopo-plot-metrics RUN_DIR [--out RUN_DIR/plots]
"""

from __future__ import annotations

import json
import os
import sys

from megatron_amopo.runtime.errors import ArgumentParser, entry_point


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a training run directory (--save or --run-dir)")
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    if not rows:
        raise ValueError(f"{path} is empty: the run logged no step")
    return rows


def pair_names(rows: list[dict]) -> list[str]:
    names = []
    for row in rows:
        for key in row:
            if key.startswith("accuracy/") and key != "accuracy/all" and key[9:] not in names:
                names.append(key[9:])
    return names


def _series(rows, kind, key):
    pts = [(r["iteration"], r[key]) for r in rows if r.get("kind") == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(run_dir: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    names = pair_names(rows)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = [
        ("loss", ["loss"]),
        ("weights", [f"weight/{n}" for n in names]),
        ("margins", [f"margin/{n}" for n in names]),
        ("accuracy", [f"accuracy/{n}" for n in names]),
    ]
    for title, keys in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            for kind, style in (("train", "-"), ("valid", "o--")):
                x, y = _series(rows, kind, key)
                if x:
                    ax.plot(x, y, style, label=f"{kind} {key.split('/')[-1]}")
            if title == "weights":
                x, y = _series(rows, "train", key.replace("weight/", "weight_mean_mode/"))
                if x:
                    ax.plot(x, y, ":", label=f"mean-mode {key.split('/')[-1]}")
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, f"{title}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


@entry_point
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    for path in plot(args.run_dir, args.out or os.path.join(args.run_dir, "plots")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
