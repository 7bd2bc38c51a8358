"""GGUF -> HF import: tiny GGUF files written here with the ``gguf`` package from tiny HF models.

The writer follows llama.cpp's conventions (gguf-py's own tensor name map, Q/K rows
permuted for llama), so a wrong name table or a missing un-permutation changes the logits.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from megatron_amopo.convert import gguf_import  # noqa: E402
from megatron_amopo.convert.gguf_import import import_gguf, plan_gguf_import  # noqa: E402
from megatron_amopo.convert.tiny_hf import make_tiny_hf_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QWEN_TOK = os.path.join(ROOT, "data", "tokenizer-qwen2")
N_BYTE_TOKENS = 256


def _tokenizer_fields() -> tuple[list[str], list[int], list[str], str]:
    """A small byte-level BPE vocabulary (Qwen2's first tokens and the merges among them) + chat tokens."""
    vocab = json.load(open(os.path.join(QWEN_TOK, "vocab.json"), encoding="utf-8"))
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][: N_BYTE_TOKENS + 64]
    known = set(tokens)
    merges = []
    for line in open(os.path.join(QWEN_TOK, "merges.txt"), encoding="utf-8"):
        parts = line.rstrip("\n").split(" ")
        if len(parts) == 2 and not line.startswith("#") and "".join(parts) in known and set(parts) <= known:
            merges.append(" ".join(parts))
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]  # NORMAL, CONTROL
    template = open(os.path.join(QWEN_TOK, "chat_template.jinja"), encoding="utf-8").read()
    return tokens, types, merges, template


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for llama (the forward of what the importer undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, arch: str, qtype=None, *, name: str = "tiny", extra=None) -> None:
    """``model`` (a HF causal LM) as a GGUF file; 2-D weights quantised to ``qtype`` if given."""
    cfg = model.config
    tokens, types, merges, template = _tokenizer_fields()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(template)
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers
    )
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        value = t.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            value = _permute(value, cfg.num_attention_heads if "q_proj" in base else cfg.num_key_value_heads)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if qtype is not None and value.ndim == 2:
            w.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, value)
    for gguf_name, value in (extra or {}).items():
        w.add_tensor(gguf_name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(tmp_path, model_type: str, tied: bool = False):
    from transformers import AutoModelForCausalLM

    make_tiny_hf_model(str(tmp_path / "src"), model_type, tied=tied, vocab_size=N_BYTE_TOKENS + 66)
    return AutoModelForCausalLM.from_pretrained(str(tmp_path / "src"), dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_float_gguf_imports_to_the_same_model(tmp_path, model_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _tiny(tmp_path, model_type)
    write_gguf(src, tmp_path / "m.gguf", model_type)
    plan = plan_gguf_import(str(tmp_path / "m.gguf"), "float32")
    import_gguf(plan, str(tmp_path / "out"), dtype="float32")
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert out.config.model_type == model_type
    ids = torch.randint(0, src.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, src(ids).logits, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "out", "src"]  # no staging directory left


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantised_gguf_is_dequantised_and_tied_embeddings_kept(tmp_path, qtype):
    from safetensors.torch import load_file

    q = gguf.GGMLQuantizationType[qtype]
    src = _tiny(tmp_path, "llama", tied=True)
    write_gguf(src, tmp_path / "m.gguf", "llama", q)
    plan = plan_gguf_import(str(tmp_path / "m.gguf"), "float32")
    assert plan.tensor_types[qtype] > 0 and plan.hf_config["tie_word_embeddings"]
    import_gguf(plan, str(tmp_path / "out"), dtype="float32")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in got
    w = src.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(w, q), q)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(expected), rtol=0, atol=0)
    assert not torch.equal(torch.from_numpy(expected), torch.from_numpy(w))  # it really was quantised


def test_bfloat16_output(tmp_path):
    src = _tiny(tmp_path, "qwen2")
    write_gguf(src, tmp_path / "m.gguf", "qwen2")
    import_gguf(plan_gguf_import(str(tmp_path / "m.gguf"), "bfloat16"), str(tmp_path / "out"), dtype="bfloat16")
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "qwen2"


def _tool():
    spec = importlib.util.spec_from_file_location("import_gguf", os.path.join(ROOT, "tools", "import_gguf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refused(capsys, *argv, code: int = 2) -> str:
    assert _tool().main(list(argv)) == code
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    write_gguf(_tiny(tmp, "llama"), tmp / "m.gguf", "llama")
    return tmp / "m.gguf"


def test_refusals_before_work(tmp_path, capsys, good_gguf):
    out = str(tmp_path / "out")
    assert "no GGUF file at" in _refused(capsys, "--gguf", str(tmp_path / "none.gguf"), "--save", out, code=3)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    assert "is not a GGUF file" in _refused(capsys, "--gguf", str(tmp_path / "x.gguf"), "--save", out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    err = _refused(capsys, "--gguf", str(good_gguf), "--save", str(tmp_path / "full"))
    assert "is not empty; pass --overwrite" in err
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    assert not os.path.exists(out)


def test_unsupported_architecture_tensor_type_and_tensor(tmp_path, capsys):
    src = _tiny(tmp_path, "llama")
    write_gguf(src, tmp_path / "gpt2.gguf", "gpt2")
    assert "architecture 'gpt2' is not supported" in _refused(
        capsys, "--gguf", str(tmp_path / "gpt2.gguf"), "--save", str(tmp_path / "o")
    )
    write_gguf(src, tmp_path / "int.gguf", "llama", extra={"blk.0.attn_norm.scale": np.zeros(4, np.int32)})
    err = _refused(capsys, "--gguf", str(tmp_path / "int.gguf"), "--save", str(tmp_path / "o"))
    assert "type I32, which the importer does not dequantise" in err
    write_gguf(src, tmp_path / "rope.gguf", "llama", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    err = _refused(capsys, "--gguf", str(tmp_path / "rope.gguf"), "--save", str(tmp_path / "o"))
    assert "'rope_freqs.weight' has no Hugging Face counterpart" in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("keep", [0.5, 0.9999])
def test_truncated_gguf_is_named_and_nothing_written(tmp_path, capsys, good_gguf, keep):
    data = good_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    err = _refused(capsys, "--gguf", str(cut), "--save", str(tmp_path / "out"), code=3)
    assert err.startswith(f"error: {cut} is truncated or corrupt (") and err.count("\n") == 1
    assert "nothing was written — download the GGUF file again" in err
    assert not (tmp_path / "out").exists()


def test_failure_leaves_no_output(tmp_path, good_gguf, monkeypatch):
    def broken(path, out):
        raise RuntimeError("tokenizer failed")

    monkeypatch.setattr(gguf_import, "_write_tokenizer", broken)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        import_gguf(plan_gguf_import(str(good_gguf)), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
