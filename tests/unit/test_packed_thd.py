"""THD bookkeeping (training/packed.py): packed rows [R, S] -> one stream [1, T] + PackedSeqParams.

Checked against the builder's own layout: every sequence keeps its tokens, labels, loss mask
and positions; cu_seqlens are the sequence lengths in row-major order; per-sequence
statistics and the AMoPO loss are identical to the block-diagonal rows; the tiny model fed
THD (Megatron's THD RoPE + SDPAttention's THD path) gives the rows' logits and gradients.
"""

from __future__ import annotations

import pytest
import torch

from megatron_amopo.config import AmopoConfig, ParallelConfig
from megatron_amopo.data.batch import build_micro_batch
from megatron_amopo.runtime.comm import free_port
from megatron_amopo.training.packed import cu_seqlens_from_segments, packed_seq_params_from_batch, to_thd
from megatron_amopo.training.step import loss_func

VOCAB, SEQ = 512, 40


def _groups(num_groups=3, seed=0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_groups):
        lengths = torch.randint(5, 21, (6,), generator=gen).tolist()  # P = 3 pairs
        groups.append(
            dict(
                tokens=[torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths],
                response_start=torch.randint(2, 5, (6,), generator=gen),
                group_id=10 + g,
                row_id=g,
                chosen_scores=torch.rand(2, generator=gen) * 5,
                rejected_scores=torch.rand(2, generator=gen) * 5,
            )
        )
    return groups


@pytest.fixture(scope="module")
def rows():
    batch = build_micro_batch(_groups(), "packed", seq_length=SEQ)
    assert int(batch["num_segments"].max()) > 1  # really packed
    return batch


def test_stream_keeps_every_sequence(rows):
    thd = to_thd(rows)
    T = int((rows["segment_ids"] >= 0).sum())
    for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert thd[k].shape == (1, T), k
    assert thd["attention_mask"] is None
    for n in range(int(rows["num_seqs"])):
        sel_rows, sel_thd = rows["segment_ids"] == n, thd["segment_ids"] == n
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(rows[k][sel_rows], thd[k][sel_thd]), (k, n)
    # cu_seqlens: sequences in row-major order, each its builder length
    order = [
        n
        for r in range(rows["tokens"].shape[0])
        for n in rows["segment_ids"][r].unique_consecutive().tolist()
        if n >= 0
    ]
    lengths = rows["seq_lengths"][order]
    assert thd["cu_seqlens"].dtype == torch.int32
    assert thd["cu_seqlens"].tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    assert thd["max_seqlen"] == int(rows["seq_lengths"].max())
    assert torch.equal(thd["group_ids"], rows["group_ids"]) and thd["num_seqs"] == rows["num_seqs"]


def test_cu_seqlens_from_segments_runs():
    seg = torch.tensor([4, 4, 4, 0, 0, 7, -1, -1])
    assert cu_seqlens_from_segments(seg).tolist() == [0, 3, 5, 6, 8]
    with pytest.raises(ValueError, match="one stream"):
        cu_seqlens_from_segments(seg[None])


def test_loss_and_statistics_identical_to_rows(rows):
    """loss_func on the stream equals loss_func on the rows (same logits per token)."""
    gen = torch.Generator().manual_seed(1)
    logits_RSV = torch.randn(*rows["tokens"].shape, VOCAB, generator=gen, dtype=torch.float64)
    thd = to_thd(rows)
    logits_1TV = logits_RSV[rows["segment_ids"] >= 0][None]
    cfg = AmopoConfig()
    loss_r, count_r, rep_r = loss_func(rows, cfg, logits_RSV.clone().requires_grad_())
    loss_t, count_t, rep_t = loss_func(thd, cfg, logits_1TV.clone().requires_grad_())
    assert count_r == count_t == len(_groups())
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-12, atol=1e-12)
    for k in ("pair_sums", "pair_counts", "weights"):
        torch.testing.assert_close(rep_t[k], rep_r[k], rtol=1e-12, atol=1e-12)
    # padding the stream (sequence parallelism) changes nothing but T and cu_seqlens
    padded = to_thd(rows, pad_to_multiple=7)
    T = thd["tokens"].shape[1]
    assert padded["tokens"].shape[1] % 7 == 0 and padded["tokens"].shape[1] >= T
    if padded["tokens"].shape[1] > T:
        assert padded["cu_seqlens"].tolist() == thd["cu_seqlens"].tolist() + [padded["tokens"].shape[1]]
        assert (padded["segment_ids"][0, T:] == -1).all() and padded["loss_mask"][0, T:].sum() == 0
    logits_pad = torch.cat([logits_1TV, torch.randn(1, padded["tokens"].shape[1] - T, VOCAB, dtype=torch.float64)], 1)
    loss_p, _, _ = loss_func(padded, cfg, logits_pad)
    torch.testing.assert_close(loss_p.detach(), loss_r.detach(), rtol=1e-12, atol=1e-12)


def test_packed_seq_params(rows):
    thd = to_thd(rows)
    p = packed_seq_params_from_batch(thd)
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(p.cu_seqlens_q, thd["cu_seqlens"]) and torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q)
    assert p.max_seqlen_q == p.max_seqlen_kv == thd["max_seqlen"]
    with pytest.raises(ValueError, match="flatten them with to_thd"):
        packed_seq_params_from_batch(rows)


def test_bad_rows_are_refused(rows):
    bad = dict(rows)
    seg = rows["segment_ids"].clone()
    seg[0, 0] = -1  # padding before real tokens
    bad["segment_ids"] = seg
    with pytest.raises(ValueError, match="padded at the end only"):
        to_thd(bad)
    seg = rows["segment_ids"].clone()
    first = seg[0, 0].item()
    real_len = int((seg[1] >= 0).sum())
    seg[1, real_len - 1] = first  # a sequence in two runs
    bad["segment_ids"] = seg
    with pytest.raises(ValueError, match="more than one run"):
        to_thd(bad)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        to_thd(rows, pad_to_multiple=0)
    with pytest.raises(KeyError, match="build_micro_batch"):
        to_thd({"tokens": rows["tokens"]})


@pytest.fixture(scope="module")
def one_rank():
    from megatron_amopo.runtime.distributed import DistEnv, destroy_distributed, initialize_distributed, set_seed

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    initialize_distributed(ParallelConfig(distributed_backend="gloo"), env)
    set_seed(3)
    yield
    destroy_distributed()


def test_model_on_thd_equals_block_diagonal_rows(one_rank, rows):
    """Megatron's THD path (RoPE per sequence, SDPAttention per sequence) == rows with the mask."""
    from megatron_amopo.model.provider import model_provider, transformer_config
    from megatron_amopo.testing.tiny import fill_deterministic, tiny_arch

    arch = tiny_arch("qwen2", vocab_size=VOCAB)
    config = transformer_config(arch, ParallelConfig(), params_dtype=torch.float32)
    model = model_provider(arch, config, use_te=False)
    fill_deterministic(model, 3, 0, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in rows.items()}
    thd = to_thd(on_device)
    results = []
    for batch, params in ((on_device, None), (thd, packed_seq_params_from_batch(thd))):
        model.zero_grad(set_to_none=True)
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], packed_seq_params=params)
        loss, _, _ = loss_func(batch, AmopoConfig(), logits)
        loss.backward()
        results.append((logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits_r, loss_r, grads_r), (logits_t, loss_t, grads_t) = results
    assert logits_t.shape == (1, thd["tokens"].shape[1], VOCAB)
    torch.testing.assert_close(logits_t[0], logits_r[on_device["segment_ids"] >= 0], rtol=1e-4, atol=1e-5)
    assert loss_t == pytest.approx(loss_r, rel=1e-5)
    for n, g in grads_r.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(grads_t[n], g, rtol=1e-4, atol=1e-6)


def test_plan_cost_follows_the_path_the_step_feeds():
    """Packed micro-batches are charged by real tokens when they go THD, by rows otherwise."""
    from types import SimpleNamespace

    from megatron_amopo.config import TrainingConfig
    from megatron_amopo.training.data import plan_cost
    from megatron_amopo.training.step import packed_thd_default

    packed = TrainingConfig(batch_layout="packed", micro_batch_size=1, train_iters=1)
    padded = TrainingConfig(batch_layout="padded", micro_batch_size=1, train_iters=1)
    assert plan_cost(packed, thd=True) == "thd" and plan_cost(packed, thd=False) == "packed"
    assert plan_cost(padded, thd=True) == "padded"
    bf16 = SimpleNamespace(bf16=True, fp16=False, kv_channels=128)
    assert packed_thd_default(bf16, use_te=True)  # TE's attention takes packed sequences only as THD
    if not torch.cuda.is_available():
        assert not packed_thd_default(bf16, use_te=False)  # CPU: rows with the block-diagonal mask
    assert not packed_thd_default(SimpleNamespace(bf16=False, fp16=False, kv_channels=128), use_te=False)
    assert not packed_thd_default(SimpleNamespace(bf16=True, fp16=False, kv_channels=12), use_te=False)
