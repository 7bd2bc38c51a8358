"""Mapping tables, shared transforms and the safetensors writer, checked against definitions.

Shape legend: G query groups, h query heads per group, d head dim, H hidden.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from megatron_amopo.convert.common import TRANSFORMS, expand, resolve_param_name
from megatron_amopo.convert.hf_io import PlannedTensor, assign_shards, parse_size, write_sharded_safetensors
from megatron_amopo.convert.registry import TABLES, table_for
from megatron_amopo.testing.tiny import tiny_arch


def _naive_qkv(q, k, v, heads, groups, d):
    """Megatron's fused QKV rows written out head by head: for each group g, its h query
    heads, then key head g, then value head g."""
    h = heads // groups
    rows = []
    for g in range(groups):
        for j in range(h):
            rows.append(q[(g * h + j) * d : (g * h + j + 1) * d])
        rows.append(k[g * d : (g + 1) * d])
        rows.append(v[g * d : (g + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize("heads,groups", [(4, 2), (8, 8), (6, 1), (14, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_interleave_matches_per_head_definition_and_inverts(heads, groups, bias):
    arch = tiny_arch("qwen2", num_attention_heads=heads, num_key_value_heads=groups, hidden_size=heads * 8)
    d, H = arch.kv_channels, arch.hidden_size
    gen = torch.Generator().manual_seed(heads * 10 + groups)
    tail = () if bias else (H,)
    q, k, v = (torch.randn(n * d, *tail, generator=gen) for n in (heads, groups, groups))
    fused = TRANSFORMS["qkv"].to_megatron([q, k, v], arch)
    assert torch.equal(fused, _naive_qkv(q, k, v, heads, groups, d))
    back = TRANSFORMS["qkv"].to_hf(fused, arch)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    if groups > 1:  # a plain [q; k; v] concatenation is a different matrix
        assert not torch.equal(fused, torch.cat([q, k, v]))


def test_gate_up_is_gate_then_up_and_inverts():
    arch = tiny_arch("llama")
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fc1 = TRANSFORMS["gate_up"].to_megatron([gate, up], arch)
    assert torch.equal(fc1[:128], gate) and torch.equal(fc1[128:], up)
    g2, u2 = TRANSFORMS["gate_up"].to_hf(fc1, arch)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_expanded_table_covers_hf_model_names_and_shapes(model_type, tied):
    import transformers

    from megatron_amopo.testing.tiny import tiny_hf_config

    cfg = tiny_hf_config(model_type, tie_word_embeddings=tied)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    want = {n: tuple(p.shape) for n, p in hf.named_parameters()}  # tied lm_head is not listed separately
    entries = expand(table_for(model_type), tiny_arch(model_type, tie_word_embeddings=tied))
    got = {n: s for e in entries for n, s in zip(e.hf_names, e.hf_shapes)}
    assert got == want
    assert len({e.megatron for e in entries}) == len(entries)
    assert ("output_layer.weight" in {e.megatron for e in entries}) != tied


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"):
        table_for("gpt2")
    assert set(TABLES) == {"qwen2", "llama", "mistral"}


def test_te_spec_names_resolve():
    te_names = {
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
    }
    assert resolve_param_name("decoder.layers.3.input_layernorm.weight", te_names) == (
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    )
    assert resolve_param_name("decoder.layers.3.pre_mlp_layernorm.weight", te_names) == (
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    )
    local = {"decoder.layers.3.input_layernorm.weight"}
    assert resolve_param_name("decoder.layers.3.input_layernorm.weight", local) in local
    with pytest.raises(KeyError, match="no parameter 'decoder.layers.9.input_layernorm.weight'"):
        resolve_param_name("decoder.layers.9.input_layernorm.weight", te_names | local)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("123") == 123
    with pytest.raises(ValueError, match="cannot parse size '2 apples'"):
        parse_size("2 apples")


def test_streaming_writer_shards_and_reads_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    values = {
        "a.weight": torch.randn(40, 30, generator=gen),
        "b.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.weight": torch.randn(100, 20, generator=gen),
        "d.weight": torch.randn(3, 5, generator=gen).to(torch.float16),
    }
    plan = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in values.items()]
    # 4800 + 14 bytes; then c's 8000 bytes fill a shard on their own; then d.
    assert [len(s) for s in assign_shards(plan, 8000)] == [2, 1, 1]
    produced = []

    def produce(name):
        produced.append(name)
        return values[name]

    files = write_sharded_safetensors(str(tmp_path), plan, produce, 8000)
    assert produced == list(values)  # one at a time, in plan order
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in plan)
    for name, t in values.items():
        with safe_open(os.path.join(tmp_path, index["weight_map"][name]), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    one = tmp_path / "single"
    one.mkdir()
    assert write_sharded_safetensors(str(one), plan, lambda n: values[n], 10**9) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()


def test_writer_refuses_a_tensor_that_does_not_match_its_plan(tmp_path):
    plan = [PlannedTensor("x", (2, 3), torch.float32)]
    with pytest.raises(RuntimeError, match=r"x: produced \(3, 2\) torch.float32, planned \(2, 3\)"):
        write_sharded_safetensors(str(tmp_path), plan, lambda n: torch.zeros(3, 2), 10**9)
