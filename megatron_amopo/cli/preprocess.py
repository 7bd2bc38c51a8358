"""Preference data -> Megatron-Core IndexedDataset of AMoPO groups (2(D+1) sequences each).

Example (the bundled HelpSteer2 rows and Qwen2 tokenizer):
  amopo-preprocess --input data/helpsteer2/train_rows.jsonl --format helpsteer2 \\
      --tokenizer data/tokenizer-qwen2 --output runs/data/helpsteer2-s2048 --seq-length 2048 --workers 2

Output layout and the metadata a training run checks: megatron_amopo/data/preprocess.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_amopo.config import add_dataclass_args, dataclass_from_args
from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.runtime.errors import ArgumentParser, entry_point


def parse_args(argv=None):
    parser = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    for cls in (PreprocessConfig, DataConfig, PromptConfig):
        add_dataclass_args(parser, cls)
    args = parser.parse_args(argv)
    return tuple(dataclass_from_args(cls, args) for cls in (DataConfig, PromptConfig, PreprocessConfig))


@entry_point
def main(argv=None) -> int:
    data_cfg, prompt_cfg, pre = parse_args(argv)
    if pre.workers > 1:
        # Workers are forked; tokenizers' own thread pool must not be live across the fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megatron_amopo.data.preprocess import preprocess, summary_line
    from megatron_amopo.runtime.progress import progress

    bar = progress(desc="rows", unit=" rows", enabled=pre.progress)
    try:
        meta = preprocess(data_cfg, prompt_cfg, pre, progress=bar)
    finally:
        bar.close()
    print(summary_line(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
