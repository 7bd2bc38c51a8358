"""Impossible layouts and unsupported models fail early with actionable messages."""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.config import ParallelConfig
from megatron_amopo.model.architectures import arch_from_hf_config, validate_layout
from megatron_amopo.runtime import cpu_compat
from megatron_amopo.runtime.distributed import DistEnv, initialize_distributed
from megatron_amopo.testing.tiny import tiny_arch, tiny_hf_config


def test_world_size_not_divisible_by_model_parallel_size():
    env = DistEnv(rank=0, world_size=6, local_rank=0, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by TP x PP x CP = 2 x 2 x 1 = 4"):
        initialize_distributed(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), env)
    assert not torch.distributed.is_initialized()  # nothing was started


def test_context_parallel_refused_on_cpu():
    env = DistEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(ValueError, match="context-parallel-size > 1 needs Transformer Engine"):
        initialize_distributed(ParallelConfig(context_parallel_size=2), env)


@pytest.mark.parametrize(
    "heads, tp, pp, match",
    [
        (10, 4, 1, r"tensor-model-parallel size 4 does not divide num_attention_heads = 10"),
        (12, 4, 1, r"tensor-model-parallel size 4 does not divide num_query_groups \(num_key_value_heads\) = 2"),
        (12, 1, 3, r"pipeline-model-parallel size 3 does not divide num_layers = 4 .* choose PP in \[1, 2, 4\]"),
    ],
)
def test_layout_the_model_cannot_take(heads, tp, pp, match):
    arch = tiny_arch(num_attention_heads=heads, num_key_value_heads=2, hidden_size=8 * heads)
    with pytest.raises(ValueError, match=match):
        validate_layout(arch, tp, pp)


def test_vocab_not_divisible_by_tp():
    with pytest.raises(ValueError, match="does not divide vocab_size = 511"):
        validate_layout(tiny_arch(vocab_size=511), 2, 1)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ValueError, match="--sequence-parallel needs --tensor-model-parallel-size > 1"):
        ParallelConfig(sequence_parallel=True)


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"unsupported model_type 'gemma2'; supported: qwen2, llama, mistral"):
        arch_from_hf_config({**tiny_hf_config("qwen2"), "model_type": "gemma2"})


def test_unsupported_rope_scaling():
    cfg = tiny_hf_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        arch_from_hf_config(cfg)
    cfg = tiny_hf_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0})
    with pytest.raises(ValueError, match="high_freq_factor=2.0 is not supported"):
        arch_from_hf_config(cfg)


def test_arch_reads_transformers5_rope_parameters():
    cfg = tiny_hf_config("qwen2")
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert arch_from_hf_config(cfg).rope_theta == 1e6


def test_cpu_compat_not_applied_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    before = torch.cuda.current_device
    assert cpu_compat.apply() is False
    assert torch.cuda.current_device is before
    assert not cpu_compat.is_applied()


def test_sliding_window_recorded():
    assert arch_from_hf_config(tiny_hf_config("mistral", sliding_window=64)).sliding_window == 64
    assert arch_from_hf_config(tiny_hf_config("mistral", sliding_window=None)).sliding_window is None
    # Qwen2 configs carry a sliding_window value that is unused unless use_sliding_window is set.
    assert arch_from_hf_config(tiny_hf_config("qwen2", sliding_window=64)).sliding_window is None
