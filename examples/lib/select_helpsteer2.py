"""Pick HelpSteer2 prompts (both rated responses) for a CPU-sized experiment, shortest first.

    python examples/lib/select_helpsteer2.py --input rows.jsonl --output picked.jsonl --take 40 \\
        [--skip 0] [--exclude used.jsonl ...] [--dimensions helpfulness verbosity]

Groups consecutive rows by prompt, keeps prompts with two different responses whose mean score over
--dimensions differs (ties give no AMoPO pair), drops prompts found in any --exclude file, orders the
rest by characters of the prompt plus its longer response and writes rows of prompts skip .. skip+take-1.
"""

from __future__ import annotations

import argparse
import json
import sys


def read_groups(path: str) -> list[list[dict]]:
    groups: list[list[dict]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if groups and groups[-1][0]["prompt"] == row["prompt"]:
                groups[-1].append(row)
            else:
                groups.append([row])
    return groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--take", type=int, required=True, help="prompts to write; 0: every usable prompt after --skip")
    p.add_argument("--skip", type=int, default=0, help="shortest prompts to pass over first")
    p.add_argument("--exclude", nargs="*", default=[], help="row files whose prompts must not be picked")
    p.add_argument("--dimensions", nargs="+", default=["helpfulness", "verbosity"])
    args = p.parse_args(argv)
    excluded = {g[0]["prompt"] for path in args.exclude for g in read_groups(path)}
    mean = lambda r: sum(r[d] for d in args.dimensions) / len(args.dimensions)  # noqa: E731
    usable = [
        g
        for g in read_groups(args.input)
        if len(g) == 2
        and g[0]["prompt"] not in excluded
        and g[0]["response"] != g[1]["response"]
        and mean(g[0]) != mean(g[1])
    ]
    usable.sort(key=lambda g: len(g[0]["prompt"]) + max(len(r["response"]) for r in g))
    picked = usable[args.skip : args.skip + args.take] if args.take > 0 else usable[args.skip :]
    if len(picked) < max(args.take, 1):
        raise SystemExit(
            f"{args.input}: only {len(picked)} usable prompts after skipping {args.skip} "
            f"(of {len(usable)} usable); lower --take or --skip"
        )
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for g in picked for r in g)
    print(f"{args.output}: {len(picked)} prompts (usable {len(usable)}, excluded {len(excluded)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
