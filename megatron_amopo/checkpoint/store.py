"""The checkpoint directory format shared by training, evaluation and the converters.

Saves are atomic (temporary directory, completion marker, rename, then the ``latest`` file).
Collective functions run on every rank; file writes happen on global rank 0. The layout is drawn
in docs/DESIGN.md, "Checkpoints".
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_amopo.model.architectures import ModelArch, arch_from_hf_config
from megatron_amopo.model.sharding import unwrap
from megatron_amopo.runtime.comm import any_rank, barrier, is_rank0
from megatron_amopo.runtime.errors import CorruptFile

FORMAT_VERSION = 1
METADATA_FILE = "amopo_model.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
MARKER = "amopo_complete.json"
TOKENIZER_DIR = "tokenizer"
# Files a HF tokenizer directory may hold (weights and model configs excluded).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class ModelMetadata:
    """Contents of ``amopo_model.json``; ``tokenizer_dir`` is an absolute path or None."""

    arch: ModelArch
    hf_config: dict
    tokenizer_dir: Optional[str]
    source: dict
    generation_config: Optional[dict] = None


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _tmp_iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f".tmp_iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by ``latest_checkpointed_iteration.txt``; None if there is none."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} holds {text!r}, not an iteration number: corrupt checkpoint directory")
    return int(text)


def write_latest_iteration(root: str, iteration: int) -> None:
    tmp = os.path.join(root, f".{LATEST_FILE}.tmp")
    with open(tmp, "w") as fh:
        fh.write(f"{iteration}\n")
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def tokenizer_files(src: Optional[str]) -> list[str]:
    if not src or not os.path.isdir(src):
        return []
    return [os.path.join(src, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]


def write_model_metadata(
    root: str,
    arch: ModelArch,
    hf_config: dict,
    tokenizer_src: Optional[str],
    *,
    source: Optional[dict] = None,
    generation_config: Optional[dict] = None,
) -> None:
    """Write ``amopo_model.json`` and copy the tokenizer files (global rank 0 only, no collective)."""
    if not is_rank0():
        return
    if arch_from_hf_config(hf_config) != arch:
        raise ValueError("architecture does not match the HF config it is written with")
    os.makedirs(root, exist_ok=True)
    files = tokenizer_files(tokenizer_src)
    if files:
        os.makedirs(os.path.join(root, TOKENIZER_DIR), exist_ok=True)
        for f in files:
            shutil.copy2(f, os.path.join(root, TOKENIZER_DIR, os.path.basename(f)))
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": arch.to_dict(),
        "hf_config": hf_config,
        "tokenizer_dir": TOKENIZER_DIR if files else None,
        "source": source or {},
    }
    if generation_config is not None:
        meta["generation_config"] = generation_config
    _write_json_atomic(os.path.join(root, METADATA_FILE), meta)


def read_model_metadata(root: str) -> ModelMetadata:
    """Read and validate ``amopo_model.json``."""
    path = os.path.join(root, METADATA_FILE)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoint at {root}: directory does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {root}: {METADATA_FILE} is missing (convert a Hugging Face model with "
            "tools/convert_hf_to_megatron.py)"
        )
    try:
        with open(path) as fh:
            meta = json.load(fh)
        version = meta["format_version"]
        arch = ModelArch(**meta["architecture"])
        hf_config = meta["hf_config"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt {path}: {type(e).__name__}: {e}") from e
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}; this version reads {FORMAT_VERSION}")
    if arch_from_hf_config(hf_config) != arch:
        raise ValueError(f"corrupt {path}: 'architecture' disagrees with 'hf_config'")
    tok = meta.get("tokenizer_dir")
    return ModelMetadata(
        arch=arch,
        hf_config=hf_config,
        tokenizer_dir=os.path.join(root, tok) if tok else None,
        source=meta.get("source") or {},
        generation_config=meta.get("generation_config"),
    )


def write_completion_marker(path: str, kind: str, extra: Optional[dict] = None) -> None:
    """List every file of a finished save with its size (read back by ``checkpoint_problem``)."""
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path)] = os.path.getsize(full)
    with open(os.path.join(path, MARKER), "w") as fh:
        json.dump({"kind": kind, "files": files, **(extra or {})}, fh, indent=1)


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete iteration directory, or None if it is."""
    if not os.path.isdir(path):
        return "directory missing"
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return f"no {MARKER} (interrupted or partial save)"
    try:
        with open(marker) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MARKER}: {e}"
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"file {rel} is missing"
        if os.path.getsize(full) != size:
            return f"file {rel} has {os.path.getsize(full)} bytes, expected {size}"
    return None


def atomic_save(
    sharded_state_dict: dict,
    root: str,
    iteration: int,
    kind: str,
    extra: Optional[dict] = None,
    content_metadata: Optional[dict] = None,
) -> str:
    """``dist_checkpointing.save`` into ``.tmp_iter_NNNNNNN``, completion marker, rename, then the
    ``latest`` file (collective; file operations on global rank 0). Returns the final directory."""
    from megatron.core import dist_checkpointing

    final, tmp = iteration_dir(root, iteration), _tmp_iteration_dir(root, iteration)
    if is_rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        dist_checkpointing.save(sharded_state_dict, tmp, content_metadata=content_metadata)
        barrier()
        if is_rank0():
            write_completion_marker(tmp, kind, {"iteration": iteration, **(extra or {})})
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_latest_iteration(root, iteration)
    except BaseException:
        if is_rank0():  # a partial staging copy would keep a full disk full
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def save_model_state(model_chunk: torch.nn.Module, root: str, iteration: int) -> str:
    """Save ``{"model": model_chunk.sharded_state_dict()}`` as ``iter_NNNNNNN`` (collective)."""
    return atomic_save({"model": unwrap(model_chunk).sharded_state_dict()}, root, iteration, "model")


def model_arch_mismatches(model_chunk: torch.nn.Module, arch: ModelArch) -> list[str]:
    """Fields on which a built ``GPTModel`` stage disagrees with ``arch``."""
    inner = unwrap(model_chunk)
    cfg = inner.config
    have = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        vocab_size=inner.vocab_size,
        qkv_bias=cfg.add_qkv_bias,
        tie_word_embeddings=inner.share_embeddings_and_output_weights,
    )
    want = arch.to_dict()
    return [f"{k}: checkpoint {want[k]}, model {v}" for k, v in have.items() if want[k] != v]


def load_model_state(
    model_chunk: torch.nn.Module,
    root: str,
    iteration: Optional[int] = None,
    strict: bool = True,
    arch: Optional[ModelArch] = None,
) -> int:
    """Load the "model" key of ``iter_NNNNNNN`` (newest by default) into ``model_chunk`` at any layout.

    ``arch``, when given, must equal the checkpoint's architecture (the model's own
    shapes are always compared). Returns the iteration loaded. Collective.
    """
    from megatron.core import dist_checkpointing

    meta = read_model_metadata(root)
    if arch is not None and arch != meta.arch:
        diff = [
            f"{k}: checkpoint {v}, requested {arch.to_dict()[k]}"
            for k, v in meta.arch.to_dict().items()
            if arch.to_dict()[k] != v
        ]
        raise ValueError(f"checkpoint at {root} is a different architecture than requested: {'; '.join(diff)}")
    mismatches = model_arch_mismatches(model_chunk, meta.arch)
    if mismatches:
        raise ValueError(
            f"checkpoint at {root} holds a {meta.arch.model_type} model that does not fit the model being "
            f"loaded: {'; '.join(mismatches)}"
        )
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint at {root}: {LATEST_FILE} is missing")
    path = iteration_dir(root, iteration)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CorruptFile(f"corrupt or partial checkpoint {path}: {problem}")
    try:
        loaded, _, not_in_ckpt = dist_checkpointing.load(
            {"model": unwrap(model_chunk).sharded_state_dict()}, path, strict="return_all"
        )
    except Exception as e:  # torch DCP / Megatron raise many types for damaged files
        raise CorruptFile(f"corrupt or partial checkpoint {path}: {type(e).__name__}: {e}") from e
    if strict and any_rank(bool(not_in_ckpt)):
        raise CorruptFile(f"checkpoint {path} lacks tensors the model needs: {sorted(not_in_ckpt)[:8]}")
    unwrap(model_chunk).load_state_dict(loaded["model"], strict=strict)
    return iteration
