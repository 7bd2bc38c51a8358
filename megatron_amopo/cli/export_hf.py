"""Megatron-Core checkpoint root -> Hugging Face model directory (docs/CONVERSION.md).

Example:
  amopo-export-hf --load runs/amopo-qwen2 --save runs/amopo-qwen2-hf --check

Reads any checkpoint in the layout of megatron_amopo/checkpoint/store.py, saved
at any TP/PP layout (the newest iteration unless --iteration), loads it at TP1/PP1
on the CPU and writes sharded safetensors + index, config.json,
generation_config.json and the tokenizer files; the result loads with
transformers.AutoModelForCausalLM.
"""

from __future__ import annotations

import argparse
import sys

from megatron_amopo.cli import hide_gpus
from megatron_amopo.runtime.errors import ArgumentParser, entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--load", required=True, help="checkpoint root (amopo_model.json + iter_NNNNNNN/)")
    p.add_argument("--save", required=True, help="HF model directory to write")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the newest)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --save if it exists and is not empty")
    p.add_argument("--check", action="store_true", help="compare HF and Megatron logits (fp32, CPU) afterwards")
    p.add_argument("--check-threshold", type=float, default=1e-4, help="max |Δlogit| allowed by --check")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from megatron_amopo.checkpoint.store import read_model_metadata
    from megatron_amopo.convert.check import check_against_hf, report_check
    from megatron_amopo.convert.hf_io import parse_size
    from megatron_amopo.convert.megatron_to_hf import convert_megatron_to_hf, resolve_iteration
    from megatron_amopo.convert.runtime import check_output_dir, single_process_distributed

    meta = read_model_metadata(args.load)  # every input check before the model is built
    iteration = resolve_iteration(args.load, args.iteration)
    parse_size(args.max_shard_size)
    check_output_dir(args.save, args.overwrite)
    with single_process_distributed():
        convert_megatron_to_hf(
            args.load, args.save, iteration=iteration, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
        print(f"wrote {args.save} ({meta.arch.model_type}, iteration {iteration})")
        if args.check:
            return report_check(check_against_hf(args.save, args.load, iteration), args.check_threshold)
    return 0


@entry_point
def main(argv=None) -> int:
    hide_gpus(argv)  # a CPU tool: with a visible GPU Megatron-Core would place RoPE tables there
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
