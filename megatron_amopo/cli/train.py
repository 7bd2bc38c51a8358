"""AMoPO preference training on Megatron-Core.

    torchrun --nproc-per-node 8 -m megatron_amopo.cli.train --load CKPT --data-path DATA \\
        --tensor-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 64 --train-epochs 3 --save OUT

Flags are generated from the dataclasses in megatron_amopo/config.py; ``--config
run.yaml`` supplies the same fields (flag names without dashes). The shape follows
Megatron's pretrain_gpt.py: ``get_batch``, ``forward_step`` and ``loss_func`` live in
megatron_amopo/training/step.py; this file only wires flags to a training run (``amopo-train``;
``pretrain_amopo.py`` in a checkout is the same command).
``--dry-run`` builds one rank's shard on the meta device instead (``--dry-run --help``).
"""

from __future__ import annotations

import os
import sys

from megatron_amopo.config import add_dry_run_args, run_arg_parser, run_config_from_args
from megatron_amopo.runtime.errors import entry_point


@entry_point  # a user error: one line on rank 0 and its exit code (runtime/errors.py)
def main(argv=None) -> int:
    if "--dry-run" in (sys.argv[1:] if argv is None else argv):  # one rank's shard on the meta device, no GPUs
        from megatron_amopo.training import dry_run

        return dry_run.main(argv)
    parser = run_arg_parser(__doc__.splitlines()[0])
    add_dry_run_args(parser)  # listed in --help; a dry run is handled above
    args = parser.parse_args(argv)
    dry = sorted(k.split(".")[1] for k, v in vars(args).items() if k.startswith("DryRunConfig.") and v is not None)
    if dry:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in dry)} only apply with --dry-run")
    cfg = run_config_from_args(args)  # all flag validation happens here, before any process group

    from megatron_amopo.runtime.comm import log0
    from megatron_amopo.runtime.distributed import destroy_distributed, initialize_distributed, set_seed
    from megatron_amopo.training.loop import StopRequested, Trainer
    from megatron_amopo.training.run import setup_run

    initialize_distributed(cfg.parallel)
    set_seed(cfg.training.seed)
    try:
        run = setup_run(cfg, training=True)  # every rank refuses a run that will not fit; rank 0 says why
        trainer = Trainer(run, StopRequested.install())
        resolved = trainer.resolved_config()
        log0("resolved configuration:\n" + _yaml(resolved))
        if trainer.writer.enabled:
            with open(os.path.join(trainer.run_dir, "config.yaml"), "w") as fh:
                fh.write(_yaml(resolved))
        trainer.train()
    finally:
        destroy_distributed()
    return 0


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)


if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer re-imports this script
    sys.exit(main())
