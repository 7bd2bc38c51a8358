"""Small random Hugging Face models built from a config (nothing downloaded).

Every parameter is drawn again from a seeded generator, biases and norm weights
included (HF initialises those to 0 and 1, which would hide a swapped bias or
norm in a conversion test). Linear weights are N(0, 1/fan_in), so activations
and logits stay O(1) to O(10) at any width.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch

from megatron_amopo.checkpoint.store import tokenizer_files

# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B): 494M parameters, tied embeddings.
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
)  # and tied embeddings
# Llama 3.1's RoPE scaling (rope_type llama3), the only scaling Megatron-Core implements.
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def tiny_hf_config(model_type: str = "qwen2", **overrides) -> dict:
    """A Hugging Face config.json dict for a tiny model of the given family."""
    cfg = dict(
        model_type=model_type,
        architectures=[
            {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
        ],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        x = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            x = 1.0 + 0.1 * x
        elif name.endswith("bias"):
            x = 0.1 * x
        elif p.dim() == 2 and "embed" not in name:
            x = x / p.shape[1] ** 0.5
        p.copy_(x.to(p.dtype))


def tokenizer_length(tokenizer_dir: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def shrink_bpe_tokenizer(src: str, out: str, size: int) -> None:
    """Write to ``out`` the first ``size`` tokens of the byte-level BPE tokenizer in ``src``: its 256
    byte tokens, its first ``size - 256 - A`` merges and its A added tokens renumbered after them.

    Still the real tokenizer (class, chat template, special tokens, pre-tokenizer); text just splits
    into more pieces, and every id is below ``size``: a vocabulary small enough that CPU tests spend
    their time in the layers, not in a 150k-way softmax. GPT-2-style files only (vocab.json,
    merges.txt, tokenizer_config.json), where merge i makes token 256 + i.
    """
    import json

    with open(os.path.join(src, "tokenizer_config.json")) as fh:
        config = json.load(fh)
    added = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
    keep = size - len(added)
    if not all(os.path.isfile(os.path.join(src, f)) for f in ("vocab.json", "merges.txt")) or keep <= 256:
        raise ValueError(
            f"cannot shrink the tokenizer in {src} to {size} tokens: it needs vocab.json and merges.txt (a "
            f"byte-level BPE) and a size above 256 + {len(added)} added tokens"
        )
    with open(os.path.join(src, "vocab.json")) as fh:
        vocab = {t: i for t, i in json.load(fh).items() if i < keep}
    with open(os.path.join(src, "merges.txt")) as fh:
        lines = fh.read().splitlines()
    header = [line for line in lines[:1] if line.startswith("#")]
    merges = lines[len(header) :][: keep - 256]
    for i, merge in enumerate(merges):
        if vocab.get(merge.replace(" ", "")) != 256 + i:
            raise ValueError(
                f"cannot shrink the tokenizer in {src}: merge {i} ({merge!r}) does not make token {256 + i}"
            )
    ids = {entry["content"]: keep + j for j, (_, entry) in enumerate(added)}
    config["added_tokens_decoder"] = {str(keep + j): entry for j, (_, entry) in enumerate(added)}
    os.makedirs(out, exist_ok=True)
    for name, obj in (("vocab.json", vocab), ("added_tokens.json", ids), ("tokenizer_config.json", config)):
        with open(os.path.join(out, name), "w") as fh:
            json.dump(obj, fh, ensure_ascii=False, indent=1)
    with open(os.path.join(out, "merges.txt"), "w") as fh:
        fh.write("\n".join(header + merges) + "\n")
    for f in ("special_tokens_map.json", "chat_template.jinja"):
        if os.path.isfile(os.path.join(src, f)):
            shutil.copy2(os.path.join(src, f), os.path.join(out, f))


def make_tiny_hf_model(
    out: str,
    model_type: str = "qwen2",
    *,
    tied: bool = False,
    tokenizer: Optional[str] = None,
    tokenizer_size: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
    **overrides,
) -> dict:
    """Write a random ``model_type`` model (safetensors, config, generation config, tokenizer) to ``out``;
    returns its config dict. ``overrides`` are config.json fields. ``tokenizer_size``: keep only that many
    tokens of ``tokenizer`` (``shrink_bpe_tokenizer``)."""
    import transformers

    if tokenizer_size is not None:
        if tokenizer is None:
            raise ValueError("a tokenizer size needs a tokenizer to shrink")
        os.makedirs(out, exist_ok=True)
        shrink_bpe_tokenizer(tokenizer, out, tokenizer_size)
        tokenizer = out

    cfg = tiny_hf_config(model_type, tie_word_embeddings=tied, **overrides)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if tokenizer is not None:
        n = tokenizer_length(tokenizer)
        if cfg["vocab_size"] < n:
            raise ValueError(
                f"vocab_size {cfg['vocab_size']} does not cover the tokenizer in {tokenizer} ({n} tokens); "
                f"pass a vocab size >= {n} (a multiple of 128 such as {-(-n // 128) * 128})"
            )
    config = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model = model.to(dtype)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for f in tokenizer_files(tokenizer) if tokenizer != out else []:
        shutil.copy2(f, os.path.join(out, os.path.basename(f)))
    return model.config.to_dict()
