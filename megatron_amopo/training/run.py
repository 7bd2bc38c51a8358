"""The one run set-up: ``RunConfig`` -> a built, loaded ``Run`` on this rank, for training
(``pretrain_amopo.py``) and evaluation (``tools/evaluate.py``), whose first step, ``setup_model``,
is also the whole set-up of the dry run (``pretrain_amopo.py --dry-run``).

In order, so that every refusal comes before the expensive part: ``setup_model`` (the model's
metadata, its sequence length against the attention window, the TransformerConfig at this layout
with its divisibility checks, and the form packed micro-batches take), then the datasets (checked
against the model's tokenizer) and this DP rank's plans, the memory pre-flight, the disk
pre-flight (training with ``--save``), then the model, the optimizer and scheduler (training),
the checkpoint and the engine. The dry run stops after ``setup_model`` and builds its stage on the
meta device from that TransformerConfig (``training/dry_run.py``). Library code: it takes a
``RunConfig``, never reads argv; parallel state must be initialised
(``runtime.distributed.initialize_distributed``); ``setup_model`` alone needs none.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_amopo.checkpoint.store import ModelMetadata, load_model_state, read_model_metadata
from megatron_amopo.config import RunConfig
from megatron_amopo.data.batch import MicroBatch
from megatron_amopo.data.planner import MicrobatchPlan
from megatron_amopo.model.architectures import ModelArch
from megatron_amopo.model.build import build_model, check_wiring
from megatron_amopo.model.provider import transformer_config
from megatron_amopo.model.sharding import unwrap
from megatron_amopo.runtime.comm import log0
from megatron_amopo.training import batches as tdata
from megatron_amopo.training import checkpointing as ckpt
from megatron_amopo.training import disk
from megatron_amopo.training.engine import Engine
from megatron_amopo.training.optimizer import build_optimizer, build_scheduler
from megatron_amopo.training.preflight import check_memory
from megatron_amopo.training.step import bind_forward_step, packed_thd_default, seq_pad_multiple


def model_config(arch: ModelArch, cfg: RunConfig, **overrides: Any) -> Any:
    """TransformerConfig of a run at ``cfg.parallel`` (``overrides``: the dry run's meta-device flags)."""
    tc = cfg.training
    config = transformer_config(
        arch,
        cfg.parallel,
        params_dtype=torch.bfloat16 if tc.bf16 else torch.float32,
        recompute_granularity=tc.recompute_granularity,
        calculate_per_token_loss=True,
        **overrides,
    )
    # Micro-batches differ in rows and length, so pipeline stages exchange shapes. Set
    # after construction: TransformerConfig's validation rejects the flag for its MoE
    # token dispatcher even in dense models.
    config.variable_seq_lengths = cfg.parallel.pipeline_model_parallel_size > 1
    return config


@dataclass(frozen=True)
class ModelSetup:
    """A run's model before anything is allocated: step one of every run, the dry run's included."""

    arch: ModelArch
    config: Any  # megatron.core TransformerConfig at cfg.parallel
    thd: bool  # packed micro-batches go to the model as one THD stream
    pad_to_multiple: int  # what a row's width / a THD stream's length divides by
    load: Optional[str] = None  # --load (None: a dry run from --hf-config)
    meta: Optional[ModelMetadata] = None  # --load's amopo_model.json


def setup_model(cfg: RunConfig, *, arch: Optional[ModelArch] = None, **config_overrides: Any) -> ModelSetup:
    """``--load``'s model (or ``arch``: the dry run's ``--hf-config``), its sequence length checked
    against the attention window, its TransformerConfig at ``cfg.parallel`` (which refuses a TP/PP
    size the model cannot take) and the form packed micro-batches take for it."""
    load, meta = None, None
    if arch is None:  # a run's model: --load's metadata
        load, meta = _model_metadata(cfg)
        arch = meta.arch
    _check_window(arch, cfg.training.seq_length)
    config = model_config(arch, cfg, **config_overrides)
    return ModelSetup(arch, config, packed_thd_default(config), seq_pad_multiple(config), load, meta)


@dataclass
class Run:
    """Everything one rank of a training or evaluation run holds.

    Training: ``split`` / ``plan`` are the training split and its plan over every epoch,
    ``valid_split`` / ``valid_plan`` the validation pass (or None). Evaluation: ``split`` is the
    evaluated dataset and ``plan`` this DP rank's share of one pass over it."""

    cfg: RunConfig
    meta: ModelMetadata
    config: Any  # megatron.core TransformerConfig
    thd: bool  # packed micro-batches go to the model as one THD stream
    pad_to_multiple: int  # what a row's width / a THD stream's length divides by
    dp_rank: int
    dp_size: int
    split: tdata.Split
    plan: MicrobatchPlan
    pair_names: list[str]
    engine: Engine
    iteration: int  # of the loaded checkpoint
    valid_split: Optional[tdata.Split] = None
    valid_plan: Optional[MicrobatchPlan] = None
    train_iters: int = 0
    microbatches_per_step: int = 0
    state: Optional[ckpt.TrainState] = None  # training progress (training only)

    @property
    def arch(self) -> ModelArch:
        return self.meta.arch

    def microbatches(
        self, split: tdata.Split, plan: MicrobatchPlan, start: int = 0, stop: Optional[int] = None
    ) -> Iterator[MicroBatch]:
        """Plan micro-batches ``start .. stop-1`` in the form this run's step feeds, built by
        ``--num-workers`` DataLoader workers (``training.batches.microbatches``)."""
        return tdata.microbatches(
            split,
            plan,
            self.cfg.training,
            start,
            stop,
            thd=self.thd,
            pad_to_multiple=self.pad_to_multiple,
            num_workers=self.cfg.training.num_workers,
        )


def setup_run(cfg: RunConfig, *, training: bool) -> Run:
    """Build this rank's run (module docstring): training, or a model-only load for evaluation."""
    from megatron.core import parallel_state as ps

    model_setup = setup_model(cfg)
    load, meta, config = model_setup.load, model_setup.meta, model_setup.config
    assert load is not None and meta is not None
    thd = model_setup.thd  # the plans charge what the step feeds
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    split, valid = tdata.open_splits(cfg.data, cfg.training.seed, _vocab_hash(meta), cfg.training.seq_length)
    if training:
        plans = _training_plans(cfg, split, valid, dp_rank, dp_size, thd)
    else:
        eval_plan = tdata.make_eval_plan(
            split, cfg.training, seed=cfg.training.seed, dp_rank=dp_rank, dp_size=dp_size, thd=thd
        )
        plans = dict(plan=eval_plan, valid_split=None, valid_plan=None, train_iters=0, microbatches_per_step=0)
    check_memory(meta.arch, cfg, split, plans["plan"], training=training)  # refuses a run that will not fit
    if training and cfg.checkpoint.save:
        disk.clean_stale_staging(cfg.checkpoint.save)  # before the check: what they held is free again
        disk.check_disk(meta.arch, cfg.checkpoint.save, cfg.training.bf16, refuse=cfg.checkpoint.disk_check)
    distributed_optimizer = training and cfg.training.use_distributed_optimizer
    model = build_model(meta.arch, config, use_distributed_optimizer=distributed_optimizer)
    check_wiring(config)
    optimizer = scheduler = state = None
    if training:
        optimizer = build_optimizer(model, cfg.optimizer, cfg.training)
        scheduler = build_scheduler(optimizer, cfg.optimizer, plans["train_iters"], cfg.training.global_batch_size)
        state, _ = ckpt.load_checkpoint(load, model, optimizer, scheduler, finetune=cfg.checkpoint.finetune)
        iteration = state.iteration
    else:
        iteration = load_model_state(unwrap(model[0]), load)
    engine = Engine(model, bind_forward_step(cfg.amopo), optimizer, scheduler)
    return Run(
        cfg=cfg,
        meta=meta,
        config=config,
        thd=thd,
        pad_to_multiple=model_setup.pad_to_multiple,
        dp_rank=dp_rank,
        dp_size=dp_size,
        split=split,
        pair_names=split.dataset.pair_names,
        engine=engine,
        iteration=iteration,
        state=state,
        **plans,
    )


def _model_metadata(cfg: RunConfig) -> tuple[str, ModelMetadata]:
    """``--load`` (required) and its model metadata."""
    if not cfg.checkpoint.load:
        raise ValueError(
            "--load is required: a converted Hugging Face model (tools/convert_hf_to_megatron.py) "
            "or a training run's checkpoint directory"
        )
    load = cfg.checkpoint.load
    return load, read_model_metadata(load)


def _check_window(arch: ModelArch, seq: int) -> None:
    window = arch.sliding_window
    if window and seq > window:
        raise ValueError(
            f"--seq-length {seq} is longer than this model's sliding attention window ({window}); full causal "
            f"attention would differ from the model's: use --seq-length <= {window}"
        )


def _vocab_hash(meta: ModelMetadata) -> Optional[str]:
    """Vocab hash of the tokenizer stored with the model (checked against the datasets)."""
    from megatron_amopo.data.tokenization import load_tokenizer, tokenizer_fingerprint

    path = meta.tokenizer_dir
    if not path:
        log0("warning: the checkpoint has no tokenizer; datasets are not checked against the model's tokenizer")
        return None
    return tokenizer_fingerprint(load_tokenizer(path), path)["vocab_hash"]


def _training_plans(
    cfg: RunConfig, train: tdata.Split, valid: Optional[tdata.Split], dp_rank: int, dp_size: int, thd: bool
) -> dict[str, Any]:
    """The training plan over every epoch the schedule needs, its step length, and the validation plan."""
    tc = cfg.training
    plan_for = lambda epochs: tdata.make_plan(  # noqa: E731
        train, tc, num_epochs=epochs, seed=tc.seed, dp_rank=dp_rank, dp_size=dp_size, thd=thd
    )
    one_epoch = plan_for(1)
    if one_epoch.num_microbatches == 0:
        raise ValueError(
            f"--data-path has {len(train)} training groups: not enough for one "
            f"micro-batch on each of {dp_size} data-parallel ranks"
        )
    per_step = tc.microbatches_per_step(dp_size, tdata.mean_groups_per_microbatch(one_epoch))
    steps_per_epoch = one_epoch.num_microbatches // per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"one epoch gives {one_epoch.num_microbatches} micro-batches per DP rank, fewer than "
            f"the {per_step} one step needs; lower --global-batch-size"
        )
    train_iters = tc.train_iters or (tc.train_epochs or 1) * steps_per_epoch
    valid_plan = None
    if valid is not None and len(valid):
        valid_plan = tdata.make_eval_plan(valid, tc, seed=tc.seed + 1, dp_rank=dp_rank, dp_size=dp_size, thd=thd)
    return dict(
        plan=plan_for(math.ceil(train_iters / steps_per_epoch)),
        valid_split=valid,
        valid_plan=valid_plan,
        train_iters=train_iters,
        microbatches_per_step=per_step,
    )
