"""Rank the (TP, PP, DP, micro-batch) layouts of an AMoPO run that fit in GPU memory.

Example (the published Qwen2.5-32B config, 4 nodes of 8 x 80 GB GPUs):
  amopo-plan-parallelism --model examples/model_configs/qwen2.5-32b.json --gpus 32 \\
      --gpu-memory-gib 80 --seq-length 1024 --num-dimensions 3

--model is a Hugging Face config.json (or its model directory) or a converted
checkpoint root (amopo_model.json). The memory model, its formulas and sources:
megatron_amopo/model/memory.py and docs/SCALING.md. Check a chosen layout rank by rank
with `pretrain_amopo.py --dry-run`.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_amopo.model import memory
from megatron_amopo.runtime.errors import ArgumentParser, entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--model", required=True, help="HF config.json / model directory, or a converted checkpoint root")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB")
    p.add_argument("--reserve-gib", type=float, default=6.0, help="left for CUDA context, NCCL, fragmentation")
    p.add_argument("--seq-length", type=int, default=1024, help="--seq-length of the run (row length S)")
    p.add_argument("--num-dimensions", type=int, default=3, help="dimensions D: 2(D+1) sequences per group")
    p.add_argument("--global-batch-size", type=int, default=128, help="groups per optimizer step")
    p.add_argument("--fp32", action="store_true", help="fp32 weights and activations instead of bf16")
    p.add_argument(
        "--unfused-attention",
        action="store_true",
        help="Megatron's local attention (stores the S x S softmax) instead of flash attention",
    )
    p.add_argument("--top", type=int, default=5, help="layouts to print")
    args = p.parse_args(argv)
    for name in ("gpus", "gpus_per_node", "seq_length", "num_dimensions", "global_batch_size", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpu_memory_gib <= args.reserve_gib:
        p.error("--gpu-memory-gib must exceed --reserve-gib")
    return args


def load_arch(path: str):
    from megatron_amopo.model.architectures import arch_from_hf_config, load_hf_config

    if os.path.isfile(os.path.join(path, "amopo_model.json")):
        from megatron_amopo.checkpoint.store import read_model_metadata

        return read_model_metadata(path).arch
    return arch_from_hf_config(load_hf_config(path))


def layout_flags(layout: memory.Layout) -> str:
    flags = [
        f"--tensor-model-parallel-size {layout.tp}",
        f"--pipeline-model-parallel-size {layout.pp}",
        f"--micro-batch-size {layout.micro_batch_size}",
    ]
    flags += ["--sequence-parallel"] if layout.sequence_parallel else []
    flags += ["--use-distributed-optimizer"] if layout.distributed_optimizer else []
    flags += [f"--recompute-granularity {layout.recompute}"] if layout.recompute != "none" else []
    return " ".join(flags)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    arch = load_arch(args.model)
    work = memory.default_workload(
        args.seq_length,
        args.num_dimensions,
        args.global_batch_size,
        bf16=not args.fp32,
        flash_attention=not args.unfused_attention,
    )
    plans, rejected = memory.plan(arch, work, args.gpus, args.gpu_memory_gib, args.gpus_per_node, args.reserve_gib)
    print(
        f"{arch.model_type}: {memory.model_parameter_count(arch):,} parameters, {arch.num_layers} layers; "
        f"{args.gpus} GPUs x {args.gpu_memory_gib:g} GiB ({args.gpu_memory_gib - args.reserve_gib:g} usable); "
        f"micro-batch unit = {work.seqs_per_group} sequences x {work.seq_length} positions per group"
    )
    if not plans:
        print(
            f"no layout fits ({rejected} candidates rejected for memory): add GPUs, shorten --seq-length or "
            "use GPUs with more memory",
            file=sys.stderr,
        )
        return 1
    print(f"{len(plans)} feasible layouts ({rejected} candidates over the memory budget); best first:")
    for i, p in enumerate(plans[: args.top], 1):
        print(f"\n{i}. {p.layout.describe()}")
        for reason in p.reasons:
            print(f"   - {reason}")
        print(f"   flags: {layout_flags(p.layout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
