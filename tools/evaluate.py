"""Evaluate a checkpoint on a preprocessed dataset: per-dimension preference accuracy,
reward margins and AMoPO loss (general pair reported separately).

    torchrun --nproc-per-node 2 tools/evaluate.py --load CKPT --data-path DATA \\
        --tensor-model-parallel-size 2 --micro-batch-size 2 --seq-length 512 [--output eval.json]

Takes the training flags (same parallel layout and batching options); the whole
dataset is evaluated once, split over data-parallel ranks. With ``--per-group-output``
every group's pair margins are written (one JSON line per group) and the JSON output
gains per-pair 95% bootstrap intervals over groups (prompts); tools/compare_evals.py
turns such files into a before/after table.
"""

from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_amopo.runtime import quiet  # noqa: E402

quiet.install()  # before anything imports Megatron-Core

from megatron_amopo.config import run_arg_parser, run_config_from_args, schedule_unused  # noqa: E402
from megatron_amopo.runtime.errors import entry_point  # noqa: E402


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

    from megatron.core import parallel_state as ps

    from megatron_amopo.checkpoint.store import load_model_state, read_model_metadata
    from megatron_amopo.data.tokenization import load_tokenizer, tokenizer_fingerprint
    from megatron_amopo.evaluation.report import format_intervals, summarize_groups, write_records
    from megatron_amopo.model.build import build_model
    from megatron_amopo.model.sharding import unwrap
    from megatron_amopo.runtime.comm import is_rank0
    from megatron_amopo.runtime.distributed import destroy_distributed, initialize_distributed, set_seed
    from megatron_amopo.training import batches as tdata
    from megatron_amopo.training.loop import evaluate_split, format_eval, log0, run_transformer_config
    from megatron_amopo.training.preflight import check_memory
    from megatron_amopo.training.step import forward_step, packed_thd_default, seq_pad_multiple

    initialize_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    try:
        meta = read_model_metadata(cfg.checkpoint.load)
        vocab_hash = None
        if meta.tokenizer_dir:
            vocab_hash = tokenizer_fingerprint(load_tokenizer(meta.tokenizer_dir), meta.tokenizer_dir)["vocab_hash"]
        split, _ = tdata.open_splits(cfg.data, cfg.training.seed, vocab_hash, cfg.training.seq_length)
        config = run_transformer_config(meta.arch, cfg)
        thd = packed_thd_default(config)  # the plan charges what the step feeds
        plan = tdata.make_eval_plan(
            split,
            cfg.training,
            seed=cfg.training.seed,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            thd=thd,
        )
        check_memory(meta.arch, cfg, split, plan, training=False)  # refuses before the model is built
        model = build_model(meta.arch, config)
        iteration = load_model_state(unwrap(model[0]), cfg.checkpoint.load)
        step = functools.partial(
            forward_step,
            objective_cfg=cfg.amopo,
            tp_group=ps.get_tensor_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(),
        )
        pair_names = split.dataset.pair_names
        per_group = args.per_group_output is not None
        values = evaluate_split(
            model,
            step,
            split,
            plan,
            cfg.training,
            pair_names,
            per_group=per_group,
            thd=thd,
            pad_to_multiple=seq_pad_multiple(config),
        )
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
