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


def make_tiny_hf_model(
    out: str,
    model_type: str = "qwen2",
    *,
    tied: bool = False,
    tokenizer: Optional[str] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
    **overrides,
) -> dict:
    """Write a random ``model_type`` model (safetensors, config, generation config, tokenizer) to ``out``;
    returns its config dict. ``overrides`` are config.json fields."""
    import transformers

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
    for f in tokenizer_files(tokenizer):
        shutil.copy2(f, os.path.join(out, os.path.basename(f)))
    return model.config.to_dict()
