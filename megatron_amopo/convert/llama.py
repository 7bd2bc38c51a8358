"""Llama 2 / 3 / 3.1 (``LlamaForCausalLM``): no biases, untied embeddings (Llama 3.2 1B/3B tie them)."""

from megatron_amopo.convert.common import Row

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

TABLE = (
    Row("embedding.word_embeddings.weight", (("model.embed_tokens.weight", ("V", "H")),)),
    Row(_M + "input_layernorm.weight", ((_L + "input_layernorm.weight", ("H",)),)),
    Row(
        _M + "self_attention.linear_qkv.weight",
        (
            (_L + "self_attn.q_proj.weight", ("Ad", "H")),
            (_L + "self_attn.k_proj.weight", ("Qd", "H")),
            (_L + "self_attn.v_proj.weight", ("Qd", "H")),
        ),
        "qkv",
    ),
    Row(_M + "self_attention.linear_proj.weight", ((_L + "self_attn.o_proj.weight", ("H", "Ad")),)),
    Row(_M + "pre_mlp_layernorm.weight", ((_L + "post_attention_layernorm.weight", ("H",)),)),
    Row(
        _M + "mlp.linear_fc1.weight",
        ((_L + "mlp.gate_proj.weight", ("F", "H")), (_L + "mlp.up_proj.weight", ("F", "H"))),
        "gate_up",
    ),
    Row(_M + "mlp.linear_fc2.weight", ((_L + "mlp.down_proj.weight", ("H", "F")),)),
    Row("decoder.final_layernorm.weight", (("model.norm.weight", ("H",)),)),
    Row("output_layer.weight", (("lm_head.weight", ("V", "H")),), untied_only=True),
)
