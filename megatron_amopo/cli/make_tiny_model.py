"""Write a tiny random Hugging Face model built from a config (nothing is downloaded).

Examples:
  amopo-make-tiny-model --arch qwen2 --out runs/tiny-qwen2 --tied \\
      --tokenizer data/tokenizer-qwen2 --vocab-size 151680
  amopo-make-tiny-model --arch llama --out runs/tiny-llama --llama3-rope
  amopo-make-tiny-model --arch qwen2 --out runs/tiny-qwen2-512 --tied \\
      --tokenizer data/tokenizer-qwen2 --tokenizer-size 512 --vocab-size 512

Without --tokenizer the vocabulary stays tiny (512) and no tokenizer is written.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_amopo.runtime.errors import ArgumentParser, UsageError, entry_point


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--arch", required=True, choices=["qwen2", "llama", "mistral"])
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (vocab size must cover it)")
    p.add_argument(
        "--tokenizer-size",
        type=int,
        default=None,
        help="keep only this many tokens of --tokenizer (a byte-level BPE: its bytes, first merges and special "
        "tokens): the real tokenizer with a vocabulary small enough for fast CPU tests",
    )
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--max-position-embeddings", type=int, default=4096)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--llama3-rope", action="store_true", help="Llama 3.1 RoPE scaling (llama only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 50MB to get an index")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_amopo.convert.tiny_hf import LLAMA3_ROPE, make_tiny_hf_model

    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"{args.out} exists and is not empty", "choose another --out or empty it")
    if args.llama3_rope and args.arch != "llama":
        raise UsageError("--llama3-rope applies to --arch llama only", "drop it or pass --arch llama")
    overrides = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
    )
    if args.llama3_rope:
        overrides["rope_scaling"] = dict(LLAMA3_ROPE)
    cfg = make_tiny_hf_model(
        args.out,
        args.arch,
        tied=args.tied,
        tokenizer=args.tokenizer,
        tokenizer_size=args.tokenizer_size,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        max_shard_size=args.max_shard_size,
        **overrides,
    )
    print(
        f"wrote {args.out}: {cfg['model_type']} with {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}, tied={cfg['tie_word_embeddings']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
