"""Bad input to the converters gets a clear error before any model is built.

The tools' ``main`` runs in this process: every check here must fire before the
process group or the model exists (the distributed tests cover the rest).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch

from megatron_amopo.checkpoint import store
from megatron_amopo.convert.hf_to_megatron import plan_import
from megatron_amopo.convert.tiny_hf import make_tiny_hf_model
from megatron_amopo.runtime.errors import ExitCode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """A tiny Qwen2 model saved in several safetensors shards with an index."""
    d = tmp_path_factory.mktemp("hf") / "qwen2"
    make_tiny_hf_model(str(d), "qwen2", max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    return d


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _run(capsys, tool, *argv):
    rc = _tool(tool).main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_unsupported_model_type_lists_supported(hf_sharded, tmp_path, capsys):
    d = _copy(hf_sharded, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", d, "--save", tmp_path / "out")
    assert rc == 2
    assert "unsupported model_type 'gpt_neox'; supported: qwen2, llama, mistral" in err
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_named(hf_sharded, tmp_path, capsys):
    d = _copy(hf_sharded, tmp_path)
    victim = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    (d / victim).unlink()
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", d, "--save", tmp_path / "out")
    assert rc == ExitCode.INPUT
    assert f"shard(s) named in model.safetensors.index.json are missing: {victim}" in err


def test_wrong_shape_for_config_names_the_tensor(hf_sharded, tmp_path, capsys):
    d = _copy(hf_sharded, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", d, "--save", tmp_path / "out")
    assert rc == 2
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape (128, 64), but config.json implies (96, 64)" in err


def test_non_empty_output_needs_overwrite(hf_sharded, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", hf_sharded, "--save", out)
    assert rc == 2 and "exists and is not empty; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "x"
    rc, err = _run(capsys, "convert_megatron_to_hf", "--load", tmp_path / "nowhere", "--save", out)
    assert rc == ExitCode.INPUT and "no checkpoint at" in err and "directory does not exist" in err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--target-tensor-parallel-size", 3, "tensor-model-parallel size 3 does not divide num_attention_heads = 4"),
        ("--target-tensor-parallel-size", 4, "does not divide num_query_groups (num_key_value_heads) = 2"),
        ("--target-pipeline-parallel-size", 3, "pipeline-model-parallel size 3 does not divide num_layers = 4"),
    ],
)
def test_layout_the_model_cannot_take(hf_sharded, tmp_path, capsys, flag, value, message):
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", hf_sharded, "--save", tmp_path / "o", flag, value)
    assert rc == 2 and message in err


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_safetensors_is_named_and_nothing_written(hf_sharded, tmp_path, capsys, damage):
    d = _copy(hf_sharded, tmp_path)
    victim = d / sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100] if damage == "truncated" else data[:4])
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", d, "--save", tmp_path / "out")
    assert rc == ExitCode.INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {victim} is truncated or corrupt (")
    assert "nothing was written — download or export the model again" in lines[0]
    assert not (tmp_path / "out").exists()


def test_truncated_bin_is_named(hf_sharded, tmp_path, capsys):
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_sharded / "config.json", d / "config.json")
    state = {}
    for f in sorted(os.listdir(hf_sharded)):
        if f.endswith(".safetensors"):
            state.update(load_file(hf_sharded / f))
    torch.save(state, d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    rc, err = _run(capsys, "convert_hf_to_megatron", "--hf-path", d, "--save", tmp_path / "out")
    assert rc == ExitCode.INPUT and len(err.strip().splitlines()) == 1
    assert f"error: {d / 'pytorch_model.bin'} is truncated or corrupt (" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()


def test_bin_weights_are_read_and_extra_tensors_refused(hf_sharded, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_sharded / "config.json", d / "config.json")
    state = {}
    for f in sorted(os.listdir(hf_sharded)):
        if f.endswith(".safetensors"):
            state.update(load_file(hf_sharded / f))
    torch.save(state, d / "pytorch_model.bin")
    plan = plan_import(str(d))
    name = "model.layers.1.self_attn.k_proj.bias"
    assert plan.weights.kind == "bin" and torch.equal(plan.weights.get(name), state[name])
    torch.save({**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) have no place in a qwen2 model.*q_norm"):
        plan_import(str(d))
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*expected model.safetensors"):
        plan_import(str(d))


@pytest.fixture
def fake_root(tmp_path):
    """A checkpoint root with valid metadata and a hand-made iteration directory."""
    from megatron_amopo.model.architectures import arch_from_hf_config
    from megatron_amopo.testing.tiny import tiny_hf_config

    cfg = tiny_hf_config("llama")
    root = tmp_path / "ckpt"
    store.write_model_metadata(str(root), arch_from_hf_config(cfg), cfg, None)
    it = root / "iter_0000000"
    it.mkdir()
    (it / "__0_0.distcp").write_bytes(b"0123456789")
    return root


def test_metadata_roundtrip_and_corruption(fake_root):
    meta = store.read_model_metadata(str(fake_root))
    assert meta.arch.model_type == "llama" and meta.tokenizer_dir is None
    assert store.latest_iteration(str(fake_root)) is None
    raw = json.loads((fake_root / "amopo_model.json").read_text())
    raw["architecture"]["num_layers"] = 2
    (fake_root / "amopo_model.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'architecture' disagrees with 'hf_config'"):
        store.read_model_metadata(str(fake_root))
    (fake_root / "amopo_model.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt .*amopo_model.json"):
        store.read_model_metadata(str(fake_root))


def test_export_refuses_missing_and_partial_checkpoints(fake_root, tmp_path, capsys):
    out = tmp_path / "hf-out"
    rc, err = _run(capsys, "convert_megatron_to_hf", "--load", fake_root, "--save", out)
    assert rc == ExitCode.INPUT and "latest_checkpointed_iteration.txt is missing" in err
    store.write_latest_iteration(str(fake_root), 0)
    rc, err = _run(capsys, "convert_megatron_to_hf", "--load", fake_root, "--save", out)
    assert rc == ExitCode.INPUT and "corrupt or partial checkpoint" in err and "no amopo_complete.json" in err
    it = fake_root / "iter_0000000"
    store.write_completion_marker(str(it), "model")
    assert store.checkpoint_problem(str(it)) is None
    (it / "__0_0.distcp").write_bytes(b"012")  # truncated after the save finished
    rc, err = _run(capsys, "convert_megatron_to_hf", "--load", fake_root, "--save", out)
    assert rc == ExitCode.INPUT and "file __0_0.distcp has 3 bytes, expected 10" in err
    rc, err = _run(capsys, "convert_megatron_to_hf", "--load", fake_root, "--save", out, "--iteration", 5)
    assert rc == ExitCode.INPUT and "iter_0000005: directory missing" in err
    (fake_root / "latest_checkpointed_iteration.txt").write_text("abc")
    rc, err = _run(capsys, "convert_megatron_to_hf", "--load", fake_root, "--save", out)
    assert rc == 2 and "not an iteration number" in err
    assert not out.exists()


def test_tiny_model_vocab_must_cover_tokenizer(tmp_path, capsys):
    tok = os.path.join(ROOT, "data", "tokenizer-qwen2")
    if not os.path.isfile(os.path.join(tok, "vocab.json")):
        pytest.skip("bundled Qwen2 tokenizer not present")
    rc, err = _run(capsys, "make_tiny_model", "--arch", "qwen2", "--out", tmp_path / "t", "--tokenizer", tok)
    assert rc == 2
    assert "vocab_size 512 does not cover the tokenizer" in err and "pass a vocab size >= 151" in err
