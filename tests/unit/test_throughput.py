"""FLOPs model, MFU, peak memory and how the trainer's log line shows them."""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.testing.tiny import tiny_arch, tiny_hf_config
from megatron_amopo.training import throughput
from megatron_amopo.training.loop import speed_values
from megatron_amopo.training.metrics import StepTotals, format_line
from megatron_amopo.training.throughput import device_peak_tflops, matmul_params, mfu, training_flops


def _totals(**host: float) -> StepTotals:
    return StepTotals(0.0, 0.0, torch.zeros(0), torch.zeros(0), **host)


def test_flops_count_every_matmul_weight_of_the_hf_model():
    """6 N_mm L + 6 layers d_attn L^2, N_mm = the HF model's Linear weights (LM head in, embedding lookup out)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_hf_config("qwen2")
    hf = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "qwen2", **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
        )
    )
    n_mm = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    arch = tiny_arch()
    assert matmul_params(arch) == n_mm
    layers, d_attn = arch.num_layers, arch.num_attention_heads * arch.kv_channels
    assert training_flops(arch, [1]) == 6 * n_mm + 6 * layers * d_attn
    assert training_flops(arch, [10, 20]) == 6 * n_mm * 30 + 6 * layers * d_attn * (100 + 400)


def test_mfu():
    assert mfu(989e12, 1.0, 1, 989.0) == pytest.approx(1.0)
    assert mfu(989e12, 2.0, 4, 989.0) == pytest.approx(0.125)  # 4 GPUs, 2 s
    assert mfu(1e12, 1.0, 1, None) is None  # no defensible peak (CPU, unknown card)


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", None), ("NVIDIA A10G", None)],
)
def test_peak_by_card(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert device_peak_tflops() == (name, peak)
    assert device_peak_tflops(500.0) == (name, 500.0)


def test_cpu_has_no_peak_and_reports_rss(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_peak_tflops() == ("cpu", None)
    values = speed_values(_totals(groups=4.0, tokens=1000.0, flops=2e12), 2.0, None)
    assert values["samples_per_s"] == 2.0 and values["tokens_per_s"] == 500.0
    assert values["tflops_per_rank"] == pytest.approx(1.0)
    assert "mfu" not in values and "max_allocated_gib" not in values
    assert values["peak_rss_gib"] == pytest.approx(throughput.peak_memory_bytes() / 2**30, rel=0.1)
    assert 0 < values["peak_rss_gib"] < 64
    line = format_line(3, 10, dict(loss=0.5, **values), ["general"])
    assert "500 tok/s | rss " in line and "MFU" not in line


def test_gpu_line_shows_mfu_and_max_allocated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 53 * 2**30 + 2**29)
    values = speed_values(_totals(groups=4.0, tokens=32000.0, flops=302.6e12), 1.0, 989.0)
    assert values["mfu"] == pytest.approx(302.6 / 989.0)
    assert values["max_allocated_gib"] == 53.5 and "peak_rss_gib" not in values
    line = format_line(3, 10, dict(loss=0.5, **values), ["general"])
    assert "32000 tok/s | MFU 30.6% | mem 53.50 GiB | ETA" in line
