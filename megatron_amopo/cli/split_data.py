"""Preference rows -> train / valid / held-out row files, split by prompt (no prompt in two splits).

Example (the bundled HelpSteer2 rows; each output file feeds amopo-preprocess --input):
  amopo-split-data --input data/helpsteer2/train_rows.jsonl --format helpsteer2 \\
      --output runs/data/hs2-split --split 80,10,10 --seed 1234

Choose hyperparameters on valid.jsonl and report on heldout.jsonl. Details: megatron_amopo/data/split.py.
"""

from __future__ import annotations

import argparse
import sys

from megatron_amopo.config import add_dataclass_args, dataclass_from_args
from megatron_amopo.data.config import DataConfig, SplitConfig
from megatron_amopo.runtime.errors import ArgumentParser, entry_point


def parse_args(argv=None) -> tuple[SplitConfig, DataConfig]:
    parser = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    add_dataclass_args(parser, SplitConfig)
    parser.add_argument("--format", default="helpsteer2", help="input record format: amopo, helpsteer2 or pairs")
    parser.add_argument("--field-map", default="", help="pairs format: where the prompt is, e.g. prompt=question")
    args = parser.parse_args(argv)
    try:
        return dataclass_from_args(SplitConfig, args), DataConfig(format=args.format, field_map=args.field_map)
    except ValueError as err:
        parser.error(str(err))


@entry_point
def main(argv=None) -> int:
    cfg, data_cfg = parse_args(argv)
    from megatron_amopo.data.split import split_rows

    summary = split_rows(cfg, data_cfg)
    parts = " | ".join(f"{name} {c['prompts']} prompts {c['rows']} rows" for name, c in summary["counts"].items())
    print(f"{parts} | seed {cfg.seed} -> {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
