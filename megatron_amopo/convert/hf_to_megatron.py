"""Hugging Face model directory -> checkpoint root (``checkpoint.store`` layout), streamed.

One TP1/PP1 ``GPTModel`` is built with uninitialised parameters and each HF tensor
is read, transformed and copied into it on its own, so the process holds the model
once plus one tensor group (e.g. q, k, v of one layer). ``dist_checkpointing`` then
writes it; any layout loads it back (``store.load_model_state``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_amopo.checkpoint import store
from megatron_amopo.convert.common import TRANSFORMS, Entry, dtype_name, expand, resolve_param_name
from megatron_amopo.convert.hf_io import HFWeights
from megatron_amopo.convert.registry import table_for
from megatron_amopo.convert.runtime import build_full_model, check_output_dir, publish, start_staging
from megatron_amopo.model.architectures import ModelArch, arch_from_hf_config, load_hf_config
from megatron_amopo.runtime.comm import is_rank0
from megatron_amopo.runtime.errors import MissingTensor
from megatron_amopo.runtime.progress import progress

# HF tensors that are not parameters (older checkpoints store RoPE buffers).
_IGNORED = ("rotary_emb.inv_freq",)


@dataclass
class ImportPlan:
    """Everything known about a HF model before any tensor is read."""

    hf_path: str
    hf_config: dict
    arch: ModelArch
    entries: list[Entry]
    weights: HFWeights
    dtype: torch.dtype


def plan_import(hf_path: str) -> ImportPlan:
    """Validate a HF model directory from config.json and file headers only."""
    hf_config = load_hf_config(hf_path)
    arch = arch_from_hf_config(hf_config)  # unsupported model_type / features raise here
    entries = expand(table_for(arch.model_type), arch)
    weights = HFWeights(hf_path)
    wanted = set()
    for e in entries:
        for name, shape in zip(e.hf_names, e.hf_shapes):
            wanted.add(name)
            if name not in weights.shapes:
                raise MissingTensor(f"{hf_path}: tensor {name} is missing (needed for {e.megatron})")
            if weights.shapes[name] != shape:
                raise ValueError(
                    f"{hf_path}: tensor {name} has shape {weights.shapes[name]}, but config.json implies {shape}"
                )
    unmapped = [
        n
        for n in weights.names()
        if n not in wanted and not n.endswith(_IGNORED) and not (arch.tie_word_embeddings and n == "lm_head.weight")
    ]
    if unmapped:
        raise ValueError(
            f"{hf_path}: {len(unmapped)} tensor(s) have no place in a {arch.model_type} model as configured "
            f"(would be dropped): {unmapped[:5]}"
        )
    dtypes = {weights.dtypes[n] for n in wanted}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    if dtype is None:
        raise ValueError(f"{hf_path}: parameters must share one floating dtype, found {dtypes}")
    return ImportPlan(hf_path, hf_config, arch, entries, weights, dtype)


@torch.no_grad()
def fill_model(model: torch.nn.Module, plan: ImportPlan) -> None:
    """Copy every HF tensor into the TP1/PP1 model, one table entry at a time."""
    params = dict(model.named_parameters())
    done = set()
    for e in progress(plan.entries, desc="HF -> Megatron", unit=" tensors"):
        value = TRANSFORMS[e.transform].to_megatron([plan.weights.get(n) for n in e.hf_names], plan.arch)
        name = resolve_param_name(e.megatron, params)
        if value.shape != params[name].shape:
            raise RuntimeError(f"{name}: mapped shape {tuple(value.shape)} != parameter {tuple(params[name].shape)}")
        params[name].copy_(value)
        done.add(name)
        del value
    left = sorted(set(params) - done)
    if left:
        raise RuntimeError(f"no HF tensor was mapped to Megatron parameter(s) {left}")


def _generation_config(hf_path: str) -> Optional[dict]:
    path = os.path.join(hf_path, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def convert_hf_to_megatron(hf_path: str, save_path: str, *, overwrite: bool = False) -> ImportPlan:
    """Write ``save_path`` from the HF model at ``hf_path``. Collective over the default group
    (every rank must be at TP1/PP1); rank 0 writes the files. Returns the validated plan."""
    plan = plan_import(hf_path)
    check_output_dir(save_path, overwrite)
    model = build_full_model(plan.arch, plan.dtype)
    fill_model(model, plan)
    tmp = start_staging(save_path)
    store.save_model_state(model, tmp, 0)
    if is_rank0():
        store.write_model_metadata(
            tmp,
            plan.arch,
            plan.hf_config,
            hf_path,
            source={
                "hf_path": os.path.abspath(hf_path),
                "params_dtype": dtype_name(plan.dtype),
                "tool": "convert_hf_to_megatron",
            },
            generation_config=_generation_config(hf_path),
        )
    publish(save_path)
    return plan
