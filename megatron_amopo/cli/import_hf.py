"""Hugging Face model directory -> Megatron-Core checkpoint root (docs/CONVERSION.md).

Example:
  amopo-import-hf --hf-path runs/tiny-qwen2 --save runs/tiny-qwen2-mcore --check

Streams tensor by tensor into one TP1/PP1 model on the CPU and saves it with
dist_checkpointing, so training loads it at any TP/PP layout. Supported model types:
qwen2, llama, mistral. No remote code is executed.
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
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json + safetensors or .bin)")
    p.add_argument("--save", required=True, help="checkpoint root to write")
    p.add_argument("--overwrite", action="store_true", help="replace --save if it exists and is not empty")
    p.add_argument("--check", action="store_true", help="compare HF and Megatron logits (fp32, CPU) afterwards")
    p.add_argument("--check-threshold", type=float, default=1e-4, help="max |Δlogit| allowed by --check")
    p.add_argument(
        "--target-tensor-parallel-size",
        type=int,
        default=1,
        help="refuse up front if training will not be able to use this TP size",
    )
    p.add_argument(
        "--target-pipeline-parallel-size",
        type=int,
        default=1,
        help="refuse up front if training will not be able to use this PP size",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from megatron_amopo.convert.check import check_against_hf, report_check
    from megatron_amopo.convert.hf_to_megatron import convert_hf_to_megatron, plan_import
    from megatron_amopo.convert.runtime import check_output_dir, single_process_distributed
    from megatron_amopo.model.architectures import validate_layout

    plan = plan_import(args.hf_path)  # every input check before the model is built
    check_output_dir(args.save, args.overwrite)
    validate_layout(plan.arch, args.target_tensor_parallel_size, args.target_pipeline_parallel_size)
    with single_process_distributed():
        convert_hf_to_megatron(args.hf_path, args.save, overwrite=args.overwrite)
        print(f"wrote {args.save} ({plan.arch.model_type}, {plan.arch.num_layers} layers, {plan.dtype})")
        if args.check:
            return report_check(check_against_hf(args.hf_path, args.save), args.check_threshold)
    return 0


@entry_point
def main(argv=None) -> int:
    hide_gpus(argv)  # a CPU tool: with a visible GPU Megatron-Core would place RoPE tables there
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
