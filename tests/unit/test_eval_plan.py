"""Evaluation plans: one pass over every group of a split, whatever the DP size and micro-batch size."""

from pathlib import Path

import numpy as np
import pytest

from megatron_amopo.config import TrainingConfig
from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.data.preprocess import preprocess
from megatron_amopo.data.reader import PreferenceGroupDataset
from megatron_amopo.training import batches

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalplan") / "uf"
    uf = str(ROOT / "data" / "ultrafeedback" / "train_rows_200.jsonl")
    tok = str(ROOT / "data" / "tokenizer-qwen2")
    pre = PreprocessConfig(input=uf, output=str(out), tokenizer=tok, limit=14, progress=False)
    preprocess(DataConfig(format="pairs", seq_length=512), PromptConfig(), pre)
    ds = PreferenceGroupDataset(str(out))
    assert len(ds) % 2 == 1  # odd: the case a balanced DP plan drops a group in
    return batches.Split(ds, np.arange(len(ds), dtype=np.int64))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mbs", [1, 2, 4])
@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_every_group_once(split, layout, mbs, dp):
    cfg = TrainingConfig(
        seq_length=512, micro_batch_size=mbs, global_batch_size=mbs * dp, batch_layout=layout, train_iters=1
    )
    plans = [batches.make_eval_plan(split, cfg, seed=7, dp_rank=r, dp_size=dp) for r in range(dp)]
    seen = np.concatenate([p.group_ids for p in plans])
    assert sorted(seen.tolist()) == list(range(len(split)))
    counts = [p.num_microbatches for p in plans]
    assert max(counts) - min(counts) <= 1  # dealt round-robin
    for p in plans:
        assert all(1 <= len(p.microbatch(m)) <= mbs for m in range(p.num_microbatches))
    # the training plan of the same split balances ranks and drops what does not fill a round
    train = [batches.make_plan(split, cfg, num_epochs=1, seed=7, dp_rank=r, dp_size=dp) for r in range(dp)]
    assert sum(len(p.group_ids) for p in train) <= len(split)
