"""Training checkpoints: model, optimizer, scheduler, progress and RNG in one
``dist_checkpointing`` save, written atomically.

Directory layout (shared with the converters, see ``checkpoint/store.py``)::

    ROOT/amopo_model.json                   architecture + HF config (from conversion)
    ROOT/latest_checkpointed_iteration.txt  newest complete iteration
    ROOT/iter_0000100/                      torch_dist files + amopo_complete.json

A save goes to ``ROOT/.tmp_iter_0000100``, gets a completion marker listing every
file and its size, and is renamed into place before the ``latest`` file moves, so a
crash mid-save leaves the previous checkpoint as the newest complete one. On load
a directory whose marker is missing or disagrees with the files is skipped with a
warning and the previous iteration is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_amopo.checkpoint.store import MARKER, atomic_save, checkpoint_problem, iteration_dir, latest_iteration
from megatron_amopo.model.sharding import unwrap
from megatron_amopo.runtime.comm import barrier, is_rank0

_ITER_RE = re.compile(r"^iter_(\d{7})$")
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Progress that a resume must restore exactly."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_microbatches: int = 0  # per DP rank: position in the micro-batch plan
    wandb_run_id: str = ""  # the W&B run a resume continues ("" before any W&B logging)


def find_loadable_iteration(root: str) -> int:
    """The newest complete checkpoint, preferring the ``latest`` pointer; warns on skipped ones."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--load {root}: no such directory")
    pointed = latest_iteration(root)
    candidates = ([pointed] if pointed is not None else []) + [
        it for it in sorted(_all_iterations(root), reverse=True) if it != pointed
    ]
    for it in candidates:
        problem = checkpoint_problem(iteration_dir(root, it))
        if problem is None:
            return it
        if is_rank0():  # printed, not warnings.warn: it must show even with warnings filtered
            print(
                f"warning: skipping checkpoint {iteration_dir(root, it)}: {problem}; trying an older one",
                file=sys.stderr,
                flush=True,
            )
    raise FileNotFoundError(
        f"--load {root}: no complete checkpoint found (expected iter_NNNNNNN/ with {MARKER}); convert a Hugging "
        "Face model with tools/convert_hf_to_megatron.py or point --load at a training run's --save directory"
    )


def _all_iterations(root: str) -> list[int]:
    return [int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(root)) if m]


def _rng_object(load: bool):
    """This rank's RNG states as a ShardedObject (one per global rank)."""
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = dist.get_world_size(), dist.get_rank()
    state = (
        None
        if load
        else {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
    )
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return dict(
        world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
    )


def save_checkpoint(
    root: str,
    model_chunks: list,
    optimizer,
    scheduler,
    state: TrainState,
    run_config: dict,
    keep_last: Optional[int] = None,
    pair_names: Optional[list[str]] = None,
) -> str:
    """Save everything a resume needs; returns the final directory. ``pair_names`` (the data's pairs, mirrored
    ones included) go into the completion marker, so a reader can tell what the model was trained on."""
    model_sd = unwrap(model_chunks[0]).sharded_state_dict()
    sharded = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=SHARDING_METADATA),
        "scheduler": scheduler.state_dict(),
        "train_state": vars(state).copy(),
        "layout": _layout(),
        "run_config": run_config,
        "rng_state": _rng_object(load=False),
    }
    final = atomic_save(
        sharded,
        root,
        state.iteration,
        "train",
        {"layout": _layout(), **({"pair_names": list(pair_names)} if pair_names else {})},
        content_metadata=SHARDING_METADATA,
    )
    if keep_last and is_rank0():
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` training checkpoints (never converted models)."""
    trained = []
    for it in sorted(_all_iterations(root), reverse=True):
        try:
            with open(os.path.join(iteration_dir(root, it), MARKER)) as fh:
                if json.load(fh).get("kind") == "train":
                    trained.append(it)
        except (OSError, ValueError):
            continue
    for it in trained[keep_last:]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


def load_checkpoint(
    root: str, model_chunks: list, optimizer=None, scheduler=None, finetune: bool = False
) -> tuple[TrainState, dict[str, Any]]:
    """Load the newest complete checkpoint under ``root`` into the given objects.

    A converted model (or ``finetune``) restores the weights only and starts at step
    0. A training checkpoint also restores optimizer, scheduler and progress, and the
    RNG states when the layout is unchanged (a resharded resume draws fresh RNG
    states; the AMoPO draws themselves are counter-based and unaffected).
    """
    from megatron.core import dist_checkpointing

    from megatron_amopo.training.optimizer import load_optimizer_state, optimizer_load_request

    it = find_loadable_iteration(root)
    path = iteration_dir(root, it)
    common = dist_checkpointing.load_common_state_dict(path)
    is_train = "train_state" in common and not finetune
    model_sd = unwrap(model_chunks[0]).sharded_state_dict()
    request: dict[str, Any] = {"model": model_sd}
    same_layout = is_train and common.get("layout") == _layout()
    if is_train:
        request["optimizer"] = optimizer_load_request(optimizer, model_sd, SHARDING_METADATA)
        if same_layout:
            request["rng_state"] = _rng_object(load=True)
    loaded = dist_checkpointing.load(request, path)
    unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
    if not is_train:
        return TrainState(), common
    load_optimizer_state(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _restore_rng(loaded["rng_state"])
    return TrainState(**common["train_state"]), common
