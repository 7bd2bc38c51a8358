"""Micro-batches built by DataLoader workers (``--num-workers``) are the main thread's, in order."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_amopo.config import TrainingConfig
from megatron_amopo.data.batch import MicroBatch
from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.data.preprocess import preprocess
from megatron_amopo.data.reader import PreferenceGroupDataset
from megatron_amopo.training import batches as tdata

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "hs2"
    rows = str(ROOT / "data" / "helpsteer2" / "train_rows.jsonl")
    tok = str(ROOT / "data" / "tokenizer-qwen2")
    pre = PreprocessConfig(input=rows, output=str(out), tokenizer=tok, limit=24, progress=False)
    preprocess(DataConfig(format="helpsteer2", seq_length=1024), PromptConfig(), pre)
    ds = PreferenceGroupDataset(str(out))
    return tdata.Split(ds, np.arange(len(ds), dtype=np.int64))


def _same(a: MicroBatch, b: MicroBatch) -> bool:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if torch.is_tensor(value):
            if not (torch.is_tensor(other) and value.dtype == other.dtype and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


@pytest.mark.parametrize("layout,thd", [("padded", False), ("packed", False), ("packed", True)])
def test_workers_build_the_main_threads_microbatches_in_order(split, layout, thd):
    cfg = TrainingConfig(seq_length=1024, micro_batch_size=2, global_batch_size=2, batch_layout=layout, train_iters=1)
    plan = tdata.make_plan(split, cfg, num_epochs=2, seed=5, dp_rank=0, dp_size=1, thd=thd)
    assert plan.num_microbatches >= 8
    start, stop = 3, plan.num_microbatches - 1  # a resume position and an early stop, as the trainer asks
    main = list(tdata.microbatches(split, plan, cfg, start, stop, thd=thd, pad_to_multiple=4))
    workers = list(tdata.microbatches(split, plan, cfg, start, stop, thd=thd, pad_to_multiple=4, num_workers=2))
    assert len(main) == len(workers) == stop - start
    assert all(_same(a, b) for a, b in zip(main, workers))
    assert {int(b.epoch) for b in workers} == {0, 1}  # the epochs travel with the micro-batches
    assert not _same(main[0], main[1])  # the comparison can fail


def test_no_microbatches_left_is_an_empty_iterator(split):
    cfg = TrainingConfig(seq_length=1024, micro_batch_size=2, global_batch_size=2, train_iters=1)
    plan = tdata.make_plan(split, cfg, num_epochs=1, seed=5, dp_rank=0, dp_size=1)
    end = plan.num_microbatches
    assert list(tdata.microbatches(split, plan, cfg, end, end + 3, num_workers=2)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a GPU")
def test_workers_pin_microbatches_on_a_gpu_machine(split):
    cfg = TrainingConfig(seq_length=1024, micro_batch_size=2, global_batch_size=2, train_iters=1)
    plan = tdata.make_plan(split, cfg, num_epochs=1, seed=5, dp_rank=0, dp_size=1)
    batch = next(tdata.microbatches(split, plan, cfg, num_workers=1))
    assert batch.tokens.is_pinned() and batch.loss_mask.is_pinned()
    moved = batch.to(torch.device("cuda"))
    assert torch.equal(moved.tokens.cpu(), batch.tokens)
