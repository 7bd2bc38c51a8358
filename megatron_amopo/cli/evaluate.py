"""Evaluate a checkpoint on a preprocessed dataset: per-dimension preference accuracy,
reward margins and AMoPO loss (general pair reported separately).

    torchrun --nproc-per-node 2 -m megatron_amopo.cli.evaluate --load CKPT --data-path DATA \\
        --tensor-model-parallel-size 2 --micro-batch-size 2 --seq-length 512 [--output eval.json]

Takes the training flags (same parallel layout and batching options); the whole
dataset is evaluated once, split over data-parallel ranks. With ``--per-group-output``
every group's pair margins are written (one JSON line per group) and the JSON output
gains per-pair 95% bootstrap intervals over groups (prompts); tools/compare_evals.py
turns such files into a before/after table.
"""

from __future__ import annotations

import json
import os
import sys

from megatron_amopo.config import run_arg_parser, run_config_from_args, schedule_unused
from megatron_amopo.runtime.errors import entry_point


@entry_point
def main(argv=None) -> int:
    parser = run_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument(
        "--per-group-output",
        default=None,
        help="write each group's pair margins here (JSON lines) and add bootstrap intervals",
    )
    parser.add_argument("--bootstrap-resamples", type=int, default=10000, help="resamples of the bootstrap")
    args = parser.parse_args(argv)
    schedule_unused(args)  # no training: the schedule length is irrelevant
    if args.bootstrap_resamples < 100:
        parser.error(f"--bootstrap-resamples must be >= 100, got {args.bootstrap_resamples}")
    for path in (args.output, args.per_group_output):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"the directory of {path} does not exist; create it first")
    cfg = run_config_from_args(args)
    if not cfg.checkpoint.load or not cfg.data.data_path:
        parser.error("--load and --data-path are required")

    from megatron_amopo.evaluation.report import format_intervals, summarize_groups, write_records
    from megatron_amopo.runtime.comm import is_rank0, log0
    from megatron_amopo.runtime.distributed import destroy_distributed, initialize_distributed, set_seed
    from megatron_amopo.training.loop import evaluate_split, format_eval
    from megatron_amopo.training.run import setup_run

    initialize_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    try:
        run = setup_run(cfg, training=False)  # refuses a run that will not fit before the model is built
        iteration, pair_names = run.iteration, run.pair_names
        per_group = args.per_group_output is not None
        values = evaluate_split(run, run.split, run.plan, per_group=per_group)
        values["iteration"] = iteration
        log0(format_eval(values, pair_names, f"eval {cfg.checkpoint.load} @ iter {iteration}"))
        if per_group:
            records = values.pop("per_group")
            values["groups"] = len(records)
            values["bootstrap"] = summarize_groups(records, pair_names, args.bootstrap_resamples)
            log0(format_intervals(values["bootstrap"], pair_names))
            if is_rank0():
                write_records(args.per_group_output, records)
        if args.output and is_rank0():
            with open(args.output, "w") as fh:
                json.dump(values, fh, indent=1)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
