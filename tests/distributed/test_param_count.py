"""The Megatron model has exactly as many parameters as the Hugging Face model of the
same published config (both built on the meta device, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.convert.tiny_hf import QWEN25_05B
from megatron_amopo.testing import run_multirank

# Values from the published config.json files of these models.
_QWEN = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0)
PUBLISHED = {
    "Qwen2.5-0.5B": dict(_QWEN, **QWEN25_05B, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(
        _QWEN,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "Qwen2.5-32B": dict(
        _QWEN,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    "Llama-3.1-8B": dict(
        model_type="llama",
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling=dict(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
            rope_type="llama3",
        ),
    ),
}
# Published totals, as a guard on the configs above.
EXPECTED = {"Qwen2.5-32B": 32_763_876_352, "Qwen2.5-0.5B": 494_032_768}


def _megatron_count(hf_cfg: dict) -> int:
    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.model.architectures import arch_from_hf_config
    from megatron_amopo.model.provider import model_provider, transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed

    parallel = ParallelConfig()
    initialize_distributed(parallel)
    arch = arch_from_hf_config(hf_cfg)
    config = transformer_config(arch, parallel, perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        model = model_provider(arch, config)
    return sum(p.numel() for p in model.parameters())


def _hf_count(hf_cfg: dict) -> int:
    import transformers

    cfg = transformers.AutoConfig.for_model(**hf_cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _count_all():
    return {name: _megatron_count(cfg) for name, cfg in PUBLISHED.items()}


@pytest.mark.distributed
def test_megatron_matches_hf_parameter_count():
    (megatron,) = run_multirank(_count_all, 1, timeout=300)
    for name, cfg in PUBLISHED.items():
        hf = _hf_count(cfg)
        assert megatron[name] == hf, (name, megatron[name], hf)
        if name in EXPECTED:
            assert hf == EXPECTED[name], name
