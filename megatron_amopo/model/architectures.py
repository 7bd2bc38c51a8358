"""Hugging Face ``config.json`` -> the architecture facts Megatron-Core needs.

Supported families are those users fine-tune with preference optimisation:
Qwen2 / Qwen2.5 (QKV bias, tied or untied embeddings), Llama 3 / 3.1 (``llama3``
RoPE scaling) and Mistral. All three are pre-norm RMSNorm decoders with SwiGLU MLPs,
grouped-query attention, RoPE and no biases other than Qwen2's QKV bias.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")

# Megatron-Core's RotaryEmbedding implements Llama 3.x scaling with these fixed
# parameters (rotary_pos_embedding.py, _apply_scaling); any other values would be
# silently ignored, so we refuse them.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelArch:
    """One decoder architecture, independent of the parallel layout."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    rope_scaling_factor: Optional[float] = None  # Llama 3.x scaling factor; None = no scaling
    sliding_window: Optional[int] = None  # Mistral's attention window; runs must stay within it

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_theta(cfg: dict) -> float:
    # transformers 5.x keeps theta in rope_parameters; 4.x in rope_theta.
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _rope_scaling(cfg: dict) -> Optional[float]:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: none, llama3)")
    for key, expected in _LLAMA3_FIXED.items():
        if float(scaling.get(key, expected)) != expected:
            raise ValueError(
                f"llama3 rope scaling with {key}={scaling[key]} is not supported: Megatron-Core's RoPE "
                f"implements {key}={expected} only"
            )
    return float(scaling["factor"])


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """Validate a Hugging Face config dict and extract the architecture."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Qwen2/Qwen2.5, Llama 3/3.1, Mistral)"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported for {model_type} (expected silu / SwiGLU)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{model_type} with attention_bias/mlp_bias is not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % groups:
        raise ValueError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {groups}")
    return ModelArch(
        model_type=model_type,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling_factor=_rope_scaling(cfg) if model_type == "llama" else None,
        sliding_window=_sliding_window(cfg),
    )


def _sliding_window(cfg: dict) -> Optional[int]:
    """The attention window, if the model uses one (Mistral v0.1; Qwen2 with use_sliding_window).

    Megatron-Core's local and TE specs here attend over the whole causal context, which
    equals sliding-window attention only for sequences no longer than the window; the
    trainer refuses longer sequences.
    """
    window = cfg.get("sliding_window")
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def load_hf_config(path: str) -> dict:
    """Read ``config.json`` from a model directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    with open(file) as fh:
        return json.load(fh)


def validate_layout(arch: ModelArch, tp: int, pp: int) -> None:
    """The TP/PP sizes this model can take (Megatron-Core's divisibility rules), as one ValueError.

    The one layout check of the package: the model provider, the planner, the dry run and
    the converters all call it.
    """
    for what, n in (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_query_groups (num_key_value_heads)", arch.num_query_groups),
        ("vocab_size", arch.vocab_size),
    ):
        if n % tp:
            raise ValueError(
                f"tensor-model-parallel size {tp} does not divide {what} = {n} of this {arch.model_type} model; "
                f"choose a TP size that divides {n}"
            )
    if arch.num_layers % pp:
        ok = [d for d in range(1, arch.num_layers + 1) if arch.num_layers % d == 0]
        raise ValueError(
            f"pipeline-model-parallel size {pp} does not divide num_layers = {arch.num_layers} of this "
            f"{arch.model_type} model (Megatron-Core gives every stage the same number of layers); choose PP in {ok}"
        )
