"""HF -> Megatron conversion gives HF's logits at every TP/PP layout, and back again bit-exactly.

One spawn of 4 gloo ranks for all architectures; for each: convert collectively at TP1/PP1 (DP4),
load the checkpoint at TP1/PP1, TP2/PP1, TP1/PP2 and TP2/PP2 and compute logits
through Megatron's schedules, save from the TP2/PP2 model, refuse a checkpoint of
another architecture, then export both checkpoints to HF. The test process compares
with HF logits (each prompt alone and as one left-padded batch) and the original
files. Random weights are N(0, 1/fan_in) with random biases and norm weights, so a
swapped or mis-split tensor moves logits by far more than the tolerance.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_amopo.testing import run_multirank

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOL = 1e-4
CASES = {
    "qwen2-untied": ("qwen2", False, {}),
    "qwen2-tied": ("qwen2", True, {}),
    "llama-llama3rope": ("llama", False, "llama3"),
    "mistral": ("mistral", False, {}),
}


def _overrides(extra):
    from megatron_amopo.convert.tiny_hf import LLAMA3_ROPE

    if extra == "llama3":
        # Llama 3.1's RoPE: theta 5e5, scaling factor 8 over 8192 original positions.
        return dict(rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, max_position_embeddings=131072)
    return dict(extra)


def _one_model(hf_dir: str, work: str, seqs: list[list[int]], check_errors: bool) -> dict:
    import torch.distributed as dist

    from megatron_amopo.checkpoint.store import load_model_state, save_model_state, write_model_metadata
    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.convert.check import megatron_logits
    from megatron_amopo.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_amopo.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_amopo.model.provider import build_model_stage, transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed

    mc, saved = os.path.join(work, "mcore"), os.path.join(work, "saved-tp2pp2")
    initialize_distributed(ParallelConfig())
    plan = convert_hf_to_megatron(hf_dir, mc)
    arch = plan.arch
    out = {"logits": {}, "errors": {}}
    for tp, pp in LAYOUTS:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        initialize_distributed(parallel)
        set_seed(11)  # the models start from random weights: the load must replace all of them
        model = build_model_stage(arch, transformer_config(arch, parallel))
        assert load_model_state(model, mc) == 0
        model.eval()
        out["logits"][(tp, pp)] = megatron_logits(model, seqs)
    # The TP2/PP2 model saves at iteration 7 into a root with the same metadata (as training does).
    if dist.get_rank() == 0:
        write_model_metadata(saved, plan.arch, plan.hf_config, None)
    save_model_state(model, saved, 7)
    if check_errors:
        for key, kwargs in (
            ("arch", dict(model_chunk=model, arch=_replace(arch, rope_theta=123.0))),
            ("model", dict(model_chunk=_other_model(arch, parallel))),
        ):
            try:
                load_model_state(root=mc, **kwargs)
            except ValueError as e:
                out["errors"][key] = str(e)
    initialize_distributed(ParallelConfig())
    convert_megatron_to_hf(mc, os.path.join(work, "hf-roundtrip"))
    assert convert_megatron_to_hf(saved, os.path.join(work, "hf-from-tp2pp2")) == 7
    return out


def _body(jobs: dict):
    """Every architecture in one spawn: starting 4 ranks costs more than the checks themselves."""
    import torch.distributed as dist

    try:
        results = {case: _one_model(*args) for case, args in jobs.items()}
    finally:
        _stop_checkpoint_writer_queue()
    return results if dist.get_rank() == 0 else None


def _stop_checkpoint_writer_queue():
    # dist_checkpointing's torch_dist writer keeps a multiprocessing Manager (a child
    # process) for its results queue; stop it so that no orphan outlives a killed rank.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue, filesystem_async._results_queue = filesystem_async._results_queue, None
    if queue is not None:
        queue._manager.shutdown()


def _replace(arch, **kw):
    import dataclasses

    return dataclasses.replace(arch, **kw)


def _other_model(arch, parallel):
    from megatron_amopo.model.provider import build_model_stage, transformer_config

    other = _replace(arch, num_layers=2, ffn_hidden_size=arch.ffn_hidden_size * 2)
    return build_model_stage(other, transformer_config(other, parallel))


def _tensors(d: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF models and logits per case, then one 4-rank spawn that converts and checks them all."""
    from transformers import AutoModelForCausalLM

    from megatron_amopo.convert.check import hf_logits, prompt_token_ids
    from megatron_amopo.convert.tiny_hf import make_tiny_hf_model

    jobs, refs = {}, {}
    for case, (model_type, tied, extra) in CASES.items():
        work = tmp_path_factory.mktemp(case)
        hf_dir = str(work / "hf")
        cfg = make_tiny_hf_model(hf_dir, model_type, tied=tied, seed=3, **_overrides(extra))
        seqs = prompt_token_ids(None, cfg["vocab_size"])
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        refs[case] = (work, hf_logits(hf, seqs, padded=False), hf_logits(hf, seqs, padded=True))
        jobs[case] = (hf_dir, str(work), seqs, case == "qwen2-untied")
    results = run_multirank(_body, 4, jobs, timeout=600)[0]
    return {case: (*refs[case], results[case]) for case in CASES}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_megatron_logits_match_hf_at_every_layout(case, converted):
    _, ref, ref_padded, res = converted[case]
    assert max(t.abs().max().item() for t in ref) > 1.0  # logits large enough for the tolerance to mean something
    assert _max_diff(ref, ref_padded) <= TOL  # left padding + mask is transparent in HF itself
    assert set(res["logits"]) == set(LAYOUTS)
    for layout, got in res["logits"].items():
        assert [t.shape for t in got] == [t.shape for t in ref], layout
        assert _max_diff(ref, got) <= TOL, (layout, _max_diff(ref, got))
        assert _max_diff(ref_padded, got) <= TOL, (layout, _max_diff(ref_padded, got))
        assert all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(ref, got)), layout


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_and_tp2pp2_save_export_the_original_files(case, converted):
    work, _, _, _ = converted[case]
    hf_dir = str(work / "hf")
    original = _tensors(hf_dir)
    assert ("lm_head.weight" in original) != CASES[case][1]  # tied Qwen2 ships no lm_head
    for exported in ("hf-roundtrip", "hf-from-tp2pp2"):
        got = _tensors(str(work / exported))
        assert sorted(got) == sorted(original), exported
        for name, t in original.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (exported, name)
        with open(work / exported / "config.json") as fh, open(os.path.join(hf_dir, "config.json")) as fh0:
            assert json.load(fh) == json.load(fh0), exported


@pytest.mark.distributed
def test_loading_another_architecture_is_refused(converted):
    errors = converted["qwen2-untied"][3]["errors"]
    assert "different architecture than requested: rope_theta: checkpoint 10000.0, requested 123.0" in errors["arch"]
    assert "does not fit the model being loaded" in errors["model"]
    assert "num_layers: checkpoint 4, model 2" in errors["model"]
    assert "ffn_hidden_size: checkpoint 128, model 256" in errors["model"]
