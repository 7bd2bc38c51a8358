"""Checkpoint root (any TP/PP layout it was saved at) -> Hugging Face model directory.

The checkpoint is loaded into one TP1/PP1 ``GPTModel`` (dist_checkpointing
reshards); the HF tensors are produced one table entry at a time and streamed into
sharded safetensors files whose headers are computed up front.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron_amopo.checkpoint import store
from megatron_amopo.convert.common import TRANSFORMS, Entry, config_dtype, expand, resolve_param_name
from megatron_amopo.convert.hf_io import PlannedTensor, parse_size, write_sharded_safetensors
from megatron_amopo.convert.registry import table_for
from megatron_amopo.convert.runtime import build_full_model, check_output_dir, publish, start_staging
from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.runtime.comm import is_rank0
from megatron_amopo.runtime.errors import CorruptFile
from megatron_amopo.runtime.progress import progress


def resolve_iteration(root: str, iteration: Optional[int]) -> int:
    """The requested iteration, or the newest; errors name what is missing."""
    if iteration is None:
        iteration = store.latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"no checkpoint at {root}: {store.LATEST_FILE} is missing")
    problem = store.checkpoint_problem(store.iteration_dir(root, iteration))
    if problem is not None:
        raise CorruptFile(f"corrupt or partial checkpoint {store.iteration_dir(root, iteration)}: {problem}")
    return iteration


class _Producer:
    """HF tensors from the model, one table entry at a time (the last entry's outputs are cached)."""

    def __init__(self, model: torch.nn.Module, entries: list[Entry], arch: ModelArch, dtype: torch.dtype):
        self.params = dict(model.named_parameters())
        self.arch, self.dtype = arch, dtype
        self.where = {n: (k, j) for k, e in enumerate(entries) for j, n in enumerate(e.hf_names)}
        self.entries = entries
        self._cached: tuple[int, tuple[torch.Tensor, ...]] = (-1, ())
        self.bar = progress(total=len(self.where), desc="Megatron -> HF", unit=" tensors")

    @torch.no_grad()
    def __call__(self, name: str) -> torch.Tensor:
        k, j = self.where[name]
        if self._cached[0] != k:
            e = self.entries[k]
            param = self.params[resolve_param_name(e.megatron, self.params)]
            self._cached = (k, TRANSFORMS[e.transform].to_hf(param.detach(), self.arch))
        self.bar.update()
        return self._cached[1][j].to(self.dtype)


def _generation_config(meta: store.ModelMetadata) -> dict:
    if meta.generation_config is not None:
        return meta.generation_config
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {"_from_model_config": True, **{k: meta.hf_config[k] for k in keys if meta.hf_config.get(k) is not None}}


def _write_side_files(out: str, meta: store.ModelMetadata) -> None:
    for name, obj in (("config.json", meta.hf_config), ("generation_config.json", _generation_config(meta))):
        with open(os.path.join(out, name), "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
    for f in store.tokenizer_files(meta.tokenizer_dir):
        shutil.copy2(f, os.path.join(out, os.path.basename(f)))


def convert_megatron_to_hf(
    load_path: str,
    save_path: str,
    *,
    iteration: Optional[int] = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> int:
    """Write ``save_path`` from the checkpoint root ``load_path``; returns the iteration exported.
    Collective over the default group (TP1/PP1 on every rank); rank 0 writes the files."""
    meta = store.read_model_metadata(load_path)
    arch = meta.arch
    entries = expand(table_for(arch.model_type), arch)
    iteration = resolve_iteration(load_path, iteration)
    max_bytes = parse_size(max_shard_size)
    dtype = config_dtype(meta.hf_config)
    check_output_dir(save_path, overwrite)
    model = build_full_model(arch, dtype)
    store.load_model_state(model, load_path, iteration)
    plan = [PlannedTensor(n, s, dtype) for e in entries for n, s in zip(e.hf_names, e.hf_shapes)]
    tmp = start_staging(save_path)
    if is_rank0():
        producer = _Producer(model, entries, arch, dtype)
        write_sharded_safetensors(tmp, plan, producer, max_bytes)
        producer.bar.close()
        _write_side_files(tmp, meta)
    publish(save_path)
    return iteration
