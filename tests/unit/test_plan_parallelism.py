"""The memory model and layout planner (megatron_amopo/model/memory.py, tools/plan_parallelism.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_amopo.convert.tiny_hf import QWEN25_05B
from megatron_amopo.model import memory
from megatron_amopo.model.architectures import arch_from_hf_config, load_hf_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "model_configs"
# Published parameter counts of these models (model cards / safetensors index totals).
PUBLISHED = {
    "qwen2.5-7b": 7_615_616_512,
    "llama3.1-8b": 8_030_261_248,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
}
GiB = memory.GiB


def arch(name: str):
    return arch_from_hf_config(load_hf_config(str(CONFIGS / f"{name}.json")))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_unique_parameters_are_the_published_total_at_every_layout(name):
    a = arch(name)
    layouts = [
        (tp, pp)
        for tp in (1, 2, 4, 8)
        for pp in (1, 2, 4, 8)
        if a.num_attention_heads % tp == 0 and a.num_query_groups % tp == 0 and a.num_layers % pp == 0
    ]
    assert len(layouts) >= 8
    for tp, pp in layouts:
        assert memory.model_parameter_count(a, tp, pp) == PUBLISHED[name], (tp, pp)


def test_tied_embedding_is_copied_to_the_last_stage_but_counted_once():
    qwen05 = dict(QWEN25_05B, model_type="qwen2", hidden_act="silu", tie_word_embeddings=True)
    a = arch_from_hf_config(qwen05)
    assert memory.model_parameter_count(a) == memory.model_parameter_count(a, 2, 4) == 494_032_768
    assert "output_layer.weight" not in memory.rank_parameter_shapes(a, 1, 1, 0)
    last = memory.rank_parameter_shapes(a, 2, 4, 3)
    assert last["output_layer.weight"] == ((151936 // 2, 896), False)


def test_qwen32b_rank0_of_tp8_pp4():
    # the figure megatron-core 0.16.1 gave when the dry run was planned (tests/unit/test_dry_run.py builds it)
    c = memory.rank_parameter_count(arch("qwen2.5-32b"), 8, 4, 0)
    assert c.total == 1_072_674_816 and c.replicated == 16 * 2 * 5120


def test_state_bytes_follow_megatron_mixed_precision():
    work = memory.default_workload()
    no_dist = memory.Layout(tp=1, pp=1, dp=8, micro_batch_size=1)
    assert sum(memory.state_bytes_per_param(work, no_dist)) == 18
    dist = replace(no_dist, distributed_optimizer=True)
    assert sum(memory.state_bytes_per_param(work, dist)) == 6 + 12 / 8
    fp32 = memory.default_workload(bf16=False)
    assert sum(memory.state_bytes_per_param(fp32, no_dist)) == 16  # no separate fp32 main weights


def test_activation_terms():
    a, work = arch("qwen2.5-7b"), memory.default_workload()
    s, h, f, kv, heads, rows = 1024, a.hidden_size, a.ffn_hidden_size, 512, a.num_attention_heads, 8
    base = memory.Layout(tp=2, pp=1, dp=4, micro_batch_size=1)
    outside, inside_sel = 2 * s * rows * 4 * h, 2 * s * rows * (2 * h + 2 * kv + 3 * f)
    lse = 4 * heads * s * rows
    assert (
        memory.layer_activation_bytes(a, work, rows, replace(base, recompute="selective")) == outside + inside_sel // 2
    )
    assert memory.layer_activation_bytes(a, work, rows, base) == outside + (inside_sel + lse) // 2
    sp = replace(base, sequence_parallel=True)
    assert memory.layer_activation_bytes(a, work, rows, sp) == (outside + inside_sel + lse) // 2
    assert memory.layer_activation_bytes(a, work, rows, replace(sp, recompute="full")) == 2 * s * rows * h // 2
    unfused = replace(work, flash_attention=False)  # Korthikanti's softmax output 2 a s^2 b, split over TP
    assert (
        memory.layer_activation_bytes(a, unfused, rows, base) - memory.layer_activation_bytes(a, work, rows, base)
        == (2 * heads * s * s * rows - lse) // 2
    )


def test_pipeline_stage0_holds_p_microbatches_and_last_stage_the_logits():
    a, work = arch("qwen2.5-32b"), memory.default_workload()
    lay = memory.Layout(tp=8, pp=4, dp=1, micro_batch_size=1, sequence_parallel=True)
    first, last = (memory.stage_memory(a, work, lay, i) for i in (0, 3))
    assert first.activations == 4 * last.activations and first.logits == 0
    tokens = 8 * 1024
    assert last.logits == 2 * 2 * tokens * (152064 // 8) + memory.LOGPROB_CHUNK_BYTES


def test_plan_respects_memory_and_nodes_and_ranks_cheapest_first():
    a, work = arch("qwen2.5-32b"), memory.default_workload()
    plans, rejected = memory.plan(a, work, num_gpus=8, gpu_memory_gib=80)
    assert plans and rejected > 0
    assert all(p.layout.recompute == "full" for p in plans)  # 32B on one node only fits recomputing everything
    plans, _ = memory.plan(a, work, num_gpus=32, gpu_memory_gib=80)
    assert plans[0].layout.recompute == "none" and plans[0].peak.total <= 74 * GiB
    assert all(p.layout.tp <= 8 and p.layout.tp * p.layout.pp * p.layout.dp == 32 for p in plans)
    assert [p.sort_key() for p in plans] == sorted(p.sort_key() for p in plans)
    assert any("pipeline bubble" in r for p in plans for r in p.reasons)
    small, _ = memory.plan(a, work, num_gpus=32, gpu_memory_gib=40)
    assert all(p.peak.total <= 34 * GiB for p in small) and len(small) < len(plans)


def test_bad_layouts():
    a = arch("qwen2.5-7b")
    with pytest.raises(ValueError, match="tensor-model-parallel size 8 does not divide num_attention_heads = 28"):
        memory.rank_parameter_shapes(a, 8, 1, 0)
    with pytest.raises(ValueError, match="pipeline-model-parallel size 3 does not divide num_layers = 28"):
        memory.rank_parameter_shapes(a, 1, 3, 0)
    with pytest.raises(ValueError, match="pipeline rank 2 out of range for PP 2"):
        memory.rank_parameter_shapes(a, 1, 2, 2)
    with pytest.raises(ValueError, match="sequence parallelism needs TP > 1"):
        memory.Layout(tp=1, pp=1, dp=1, micro_batch_size=1, sequence_parallel=True)


def test_cli(capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_parallelism", REPO / "tools" / "plan_parallelism.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--model", str(CONFIGS / "qwen2.5-14b.json"), "--gpus", "16", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "14,770,033,664 parameters" in out and out.count("flags: --tensor-model-parallel-size") == 2
    assert tool.main(["--model", str(CONFIGS / "qwen2.5-32b.json"), "--gpus", "1"]) == 1
    assert "no layout fits" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert tool.main(["--model", str(tmp_path), "--gpus", "8"]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err
