"""Before/after table of per-group evaluations (tools/evaluate.py --per-group-output files).

    amopo-compare-evals --baseline before.jsonl --arm gaussian=after_g.jsonl \\
        --arm equal=after_e.jsonl [--pairs general helpfulness] [--output table.md]

Per arm and pair (and ``all``: per group, the mean over its general and dimension pairs): accuracy
and mean margin with 95% bootstrap intervals over groups (prompts), and the gain over the baseline
(the untrained model on the same groups) with a 95% paired-bootstrap interval; '*' marks a gain
whose interval excludes zero. Evaluations of data preprocessed with ``--dimension-pairs mirrored``
add a second table: steerability and flip rate per dimension (evaluation/report.py).
"""

from __future__ import annotations

import os
import sys

from megatron_amopo.evaluation.report import (
    ALL,
    DEFAULT_RESAMPLES,
    comparison_table,
    mirrored_dimensions,
    pair_names_of,
    read_records,
    steerability_table,
)
from megatron_amopo.runtime.errors import ArgumentParser, UsageError, entry_point


@entry_point
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="per-group file of the untrained model")
    p.add_argument("--arm", action="append", required=True, metavar="NAME=FILE", help="per-group file of an arm")
    p.add_argument("--pairs", nargs="+", default=None, help="pairs to show (default: all in --baseline)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--output", default=None, help="also write the table here")
    args = p.parse_args(argv)
    arms = []
    for item in args.arm:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--arm must be NAME=FILE, got {item!r}")
        arms.append((name, path))
    for path in [args.baseline] + [path for _, path in arms]:
        if not os.path.isfile(path):
            p.error(f"{path} does not exist")
    try:
        baseline = read_records(args.baseline)
        loaded = [(name, read_records(path)) for name, path in arms]
        known = pair_names_of(baseline) + [ALL]
        pairs = args.pairs or known
        unknown = [x for x in pairs if x not in known]
        if unknown:
            p.error(f"--pairs {unknown} are not in {args.baseline} (it has {known})")
        table = comparison_table(baseline, loaded, pairs, args.resamples, args.seed)
        steer = mirrored_dimensions(baseline)
        if steer:
            table += "\n\n" + steerability_table(baseline, loaded, steer, args.resamples, args.seed)
    except ValueError as err:
        raise UsageError(f"compare_evals: {err}", "check the --baseline and --arm files") from err
    print(table)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
