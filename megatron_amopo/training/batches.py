"""Datasets, micro-batch plans and the iterators the schedules consume.

Every rank of a model replica (all TP ranks and PP stages) builds the same plan for
its DP rank, so tensor-parallel ranks see identical data. The plan is
deterministic in (seed, DP rank, DP size), so a resume only needs the position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.utils.data

from megatron_amopo.config import TrainDataConfig, TrainingConfig
from megatron_amopo.data.batch import MicroBatch, build_micro_batch
from megatron_amopo.data.planner import MicrobatchPlan, plan_microbatches
from megatron_amopo.data.reader import PreferenceGroupDataset


@dataclass
class Split:
    """A dataset and the group ids of it that one split uses."""

    dataset: PreferenceGroupDataset
    group_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.group_ids)


def open_splits(
    cfg: TrainDataConfig, seed: int, vocab_hash: Optional[str], seq_length: int
) -> tuple[Split, Optional[Split]]:
    """Training and (optional) validation splits, checked against the run's tokenizer."""
    if not cfg.data_path:
        raise ValueError("--data-path is required: a dataset directory written by tools/preprocess_data.py")

    def open_dataset(path: str) -> PreferenceGroupDataset:
        return PreferenceGroupDataset(path, vocab_hash=vocab_hash, dimensions=cfg.dimensions, seq_length=seq_length)

    train = open_dataset(cfg.data_path)
    if cfg.valid_data_path:
        valid = open_dataset(cfg.valid_data_path)
        if valid.pair_names != train.pair_names:
            raise ValueError(
                f"--valid-data-path pairs {valid.pair_names} differ from --data-path's {train.pair_names}; "
                "preprocess both with the same --dimensions and --dimension-pairs"
            )
        return Split(train, np.arange(len(train))), Split(valid, np.arange(len(valid)))
    ids = np.arange(len(train))
    if not cfg.split:
        return Split(train, ids), None
    train_frac, _ = cfg.split_fractions()
    perm = np.random.default_rng(seed).permutation(len(train))
    cut = int(round(train_frac * len(train)))
    if cut == 0 or cut == len(train) and train_frac < 1:
        raise ValueError(f"--split {cfg.split} leaves an empty split of {len(train)} groups")
    return Split(train, np.sort(perm[:cut])), (Split(train, np.sort(perm[cut:])) if cut < len(train) else None)


def plan_cost(train_cfg: TrainingConfig, thd: bool) -> Literal["padded", "packed", "thd"]:
    """The planner's micro-batch cost: ``padded`` rows; ``packed`` rows under the ROW RULE; ``thd``
    (real tokens) when packed micro-batches reach the model as one THD stream (``thd``, see
    ``training.step.packed_thd_default``), which has no padding to charge."""
    if train_cfg.batch_layout != "packed":
        return "padded"
    return "thd" if thd else "packed"


def make_plan(
    split: Split,
    train_cfg: TrainingConfig,
    *,
    num_epochs: int,
    seed: int,
    dp_rank: int,
    dp_size: int,
    thd: bool = False,
) -> MicrobatchPlan:
    """This DP rank's micro-batches over ``num_epochs`` epochs; group ids index the dataset.

    ``thd``: packed micro-batches go to the model as THD streams (charged by real tokens)."""
    ds = split.dataset
    plan = plan_microbatches(
        ds.group_max_len[split.group_ids],
        ds.group_total_len[split.group_ids],
        seq_lens=ds.group_seq_lens[split.group_ids],
        seq_length=train_cfg.seq_length,
        seqs_per_group=2 * ds.num_pairs,
        num_epochs=num_epochs,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        groups_per_microbatch=train_cfg.micro_batch_size,
        token_budget=train_cfg.micro_batch_tokens,
        cost=plan_cost(train_cfg, thd),
        window=train_cfg.plan_window,
    )
    return MicrobatchPlan(plan.offsets, split.group_ids[plan.group_ids], plan.epochs, plan.dropped_groups)


def make_eval_plan(
    split: Split, train_cfg: TrainingConfig, *, seed: int, dp_rank: int, dp_size: int, thd: bool = False
) -> MicrobatchPlan:
    """This DP rank's share of ONE pass over every group of ``split`` (evaluation).

    The one-rank plan, plus the groups it leaves out (a short fixed-k tail) as extra micro-batches, dealt
    round-robin: micro-batch m goes to DP rank m % dp_size. Ranks may get different counts (one fewer, or none):
    a forward-only pass has no per-micro-batch collective across DP ranks."""
    whole = make_plan(split, train_cfg, num_epochs=1, seed=seed, dp_rank=0, dp_size=1, thd=thd)
    left = np.setdiff1d(split.group_ids, whole.group_ids)
    k = train_cfg.micro_batch_size or 1
    tail = [len(left) % k] if len(left) % k else []
    sizes = np.array([*np.diff(whole.offsets), *[k] * (len(left) // k), *tail], dtype=np.int64)
    ids = np.concatenate([whole.group_ids, left]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    mine = np.arange(dp_rank, len(sizes), dp_size)
    group_ids = np.concatenate([ids[offsets[m] : offsets[m + 1]] for m in mine] + [np.zeros(0, np.int64)])
    offsets_mine = np.concatenate([[0], np.cumsum(sizes[mine])]).astype(np.int64)
    return MicrobatchPlan(offsets_mine, group_ids, np.zeros(len(mine), np.int64), 0)


class PlannedMicroBatches(torch.utils.data.Dataset):
    """Micro-batches ``start .. stop-1`` of a plan as a map-style dataset: item i is micro-batch
    ``start + i`` in the form the step feeds, packed ones as THD streams (T a multiple of
    ``pad_to_multiple``) when ``thd`` (``training.step.packed_thd_default``)."""

    def __init__(
        self,
        split: Split,
        plan: MicrobatchPlan,
        train_cfg: TrainingConfig,
        start: int = 0,
        stop: Optional[int] = None,
        *,
        thd: bool = False,
        pad_to_multiple: int = 1,
    ) -> None:
        self.split, self.plan, self.train_cfg = split, plan, train_cfg
        self.start = start
        self.stop = plan.num_microbatches if stop is None else min(stop, plan.num_microbatches)
        self.thd, self.pad_to_multiple = thd, pad_to_multiple

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int) -> MicroBatch:
        m = self.start + i
        groups = [self.split.dataset[int(g)] for g in self.plan.microbatch(m)]
        layout = self.train_cfg.batch_layout
        return build_micro_batch(
            groups,
            layout=layout,
            seq_length=self.train_cfg.seq_length if layout == "packed" else None,
            thd=self.thd,
            pad_to_multiple=self.pad_to_multiple,
            epoch=int(self.plan.epochs[m]),
        )


def microbatches(
    split: Split,
    plan: MicrobatchPlan,
    train_cfg: TrainingConfig,
    start: int = 0,
    stop: Optional[int] = None,
    *,
    thd: bool = False,
    pad_to_multiple: int = 1,
    num_workers: int = 0,
) -> Iterator[MicroBatch]:
    """Plan micro-batches ``start .. stop-1`` in order (``PlannedMicroBatches``).

    ``num_workers`` > 0: built ahead of the step by that many DataLoader worker processes (forked:
    the memory-mapped dataset is shared, nothing is pickled), into pinned memory when a GPU takes
    them (``MicroBatch.to`` then copies asynchronously). 0: built on this thread when asked for."""
    items = PlannedMicroBatches(split, plan, train_cfg, start, stop, thd=thd, pad_to_multiple=pad_to_multiple)
    if num_workers == 0 or len(items) == 0:
        return (items[i] for i in range(len(items)))
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=None,  # items are whole micro-batches: no collation
        shuffle=False,
        num_workers=min(num_workers, len(items)),
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork",
    )
    return iter(loader)


def mean_groups_per_microbatch(plan: MicrobatchPlan) -> float:
    return float(len(plan.group_ids)) / max(plan.num_microbatches, 1)
