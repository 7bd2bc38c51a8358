"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): QKV bias, optionally tied embeddings.

Small Qwen2 models (0.5B-3B) ship tied embeddings and no ``lm_head.weight``.
"""

from megatron_amopo.convert import llama
from megatron_amopo.convert.common import Row

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

# Llama's table plus the QKV bias, interleaved per query group like the weight.
_QKV_BIAS = Row(
    _M + "self_attention.linear_qkv.bias",
    (
        (_L + "self_attn.q_proj.bias", ("Ad",)),
        (_L + "self_attn.k_proj.bias", ("Qd",)),
        (_L + "self_attn.v_proj.bias", ("Qd",)),
    ),
    "qkv",
)
_AFTER_QKV = next(i for i, row in enumerate(llama.TABLE) if row.megatron.endswith("linear_qkv.weight")) + 1
TABLE = llama.TABLE[:_AFTER_QKV] + (_QKV_BIAS,) + llama.TABLE[_AFTER_QKV:]
