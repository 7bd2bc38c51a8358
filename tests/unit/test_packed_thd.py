"""Packed micro-batches as one THD stream (the builder's ``thd=True``) against the same micro-batch
as packed rows with the block-diagonal mask.

Per-sequence statistics and the AMoPO loss are identical; ``PackedSeqParams`` carries the builder's
cu_seqlens; the tiny model fed THD (Megatron's THD RoPE + SDPAttention's THD path) gives the rows'
logits and gradients; the step refuses packed rows where the attention would drop their mask.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_amopo.config import AmopoConfig, ParallelConfig
from megatron_amopo.data.batch import Group, MicroBatch, build_micro_batch
from megatron_amopo.runtime.comm import free_port
from megatron_amopo.training.step import loss_func, packed_seq_params

VOCAB, SEQ = 512, 40


def _groups(num_groups=3, seed=0) -> list[Group]:
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_groups):
        lengths = torch.randint(5, 21, (6,), generator=gen).tolist()  # P = 3 pairs
        groups.append(
            Group(
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
    assert batch.tokens.shape[0] < batch.num_seqs  # really packed
    return batch


@pytest.fixture(scope="module")
def thd():
    return build_micro_batch(_groups(), "packed", seq_length=SEQ, thd=True)


def _rows_to_stream(rows: MicroBatch, x_RS: torch.Tensor) -> torch.Tensor:
    """Values at the rows' positions [R, S, ...] -> the THD stream's order [1, T, ...] (sequence by sequence)."""
    return torch.cat([x_RS[rows.segment_ids == n] for n in range(rows.num_seqs)])[None]


def test_loss_and_statistics_identical_to_rows(rows, thd):
    """loss_func on the stream equals loss_func on the rows (same logits per token)."""
    gen = torch.Generator().manual_seed(1)
    logits_RSV = torch.randn(*rows.tokens.shape, VOCAB, generator=gen, dtype=torch.float64)
    logits_1TV = _rows_to_stream(rows, logits_RSV)
    for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert torch.equal(_rows_to_stream(rows, getattr(rows, k)), getattr(thd, k)), k
    cfg = AmopoConfig()
    loss_r, count_r, rep_r = loss_func(rows, cfg, logits_RSV.clone().requires_grad_())
    loss_t, count_t, rep_t = loss_func(thd, cfg, logits_1TV.clone().requires_grad_())
    assert count_r == count_t == len(_groups())
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-12, atol=1e-12)
    for k in ("pair_sums", "pair_counts", "weights"):
        torch.testing.assert_close(getattr(rep_t, k), getattr(rep_r, k), rtol=1e-12, atol=1e-12)
    # padding the stream (sequence parallelism) changes nothing but T and cu_seqlens
    padded = build_micro_batch(_groups(), "packed", seq_length=SEQ, thd=True, pad_to_multiple=7)
    T, T_pad = thd.tokens.shape[1], padded.tokens.shape[1]
    assert T_pad % 7 == 0 and T_pad >= T
    logits_pad = torch.cat([logits_1TV, torch.randn(1, T_pad - T, VOCAB, dtype=torch.float64)], 1)
    loss_p, _, _ = loss_func(padded, cfg, logits_pad)
    torch.testing.assert_close(loss_p.detach(), loss_r.detach(), rtol=1e-12, atol=1e-12)


def test_packed_seq_params(rows, thd):
    p = packed_seq_params(thd)
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(p.cu_seqlens_q, thd.cu_seqlens) and torch.equal(p.cu_seqlens_kv, p.cu_seqlens_q)
    assert p.max_seqlen_q == p.max_seqlen_kv == thd.max_seqlen == max(thd.seq_lengths)
    assert isinstance(p.max_seqlen_q, int)  # a host value: no device sync in the attention
    assert packed_seq_params(rows) is None  # rows: the mask path


def test_step_refuses_what_the_model_would_get_wrong(rows, monkeypatch):
    from megatron_amopo.training import step
    from megatron_amopo.training.step import forward_step, get_batch

    with pytest.raises(TypeError, match="build_micro_batch"):
        get_batch(iter([{"tokens": torch.zeros(1, 4)}]))
    model = torch.nn.Module()  # never called: the step refuses first
    with pytest.raises(ValueError, match="thd=True"):  # TE's attention drops the rows' mask
        forward_step(iter([rows]), model, objective_cfg=AmopoConfig(), use_te=True)
    odd = build_micro_batch(_groups(), "packed", seq_length=SEQ, thd=True)
    if odd.tokens.shape[1] % 2 == 0:
        odd = dataclasses.replace(odd, tokens=odd.tokens[:, 1:])
    monkeypatch.setattr(step.dist, "get_world_size", lambda group: 2)  # a TP group of 2, without one
    with pytest.raises(ValueError, match="pad_to_multiple"):
        packed_seq_params(odd, object(), sequence_parallel=True)


@pytest.fixture(scope="module")
def one_rank():
    from megatron_amopo.runtime.distributed import DistEnv, destroy_distributed, initialize_distributed, set_seed

    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    initialize_distributed(ParallelConfig(distributed_backend="gloo"), env)
    set_seed(3)
    yield
    destroy_distributed()


def test_model_on_thd_equals_block_diagonal_rows(one_rank, rows, thd):
    """Megatron's THD path (RoPE per sequence, SDPAttention per sequence) == rows with the mask."""
    from megatron_amopo.model.provider import model_provider, transformer_config
    from megatron_amopo.testing.tiny import fill_deterministic, tiny_arch

    arch = tiny_arch("qwen2", vocab_size=VOCAB)
    config = transformer_config(arch, ParallelConfig(), params_dtype=torch.float32)
    model = model_provider(arch, config, use_te=False)
    fill_deterministic(model, 3, 0, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rows, thd = rows.to(device), thd.to(device)
    results = []
    for batch in (rows, thd):
        model.zero_grad(set_to_none=True)
        logits = model(
            batch.tokens, batch.position_ids, batch.attention_mask, packed_seq_params=packed_seq_params(batch)
        )
        loss, _, _ = loss_func(batch, AmopoConfig(), logits)
        loss.backward()
        results.append((logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits_r, loss_r, grads_r), (logits_t, loss_t, grads_t) = results
    assert logits_t.shape == (1, thd.tokens.shape[1], VOCAB)
    torch.testing.assert_close(logits_t, _rows_to_stream(rows, logits_r), rtol=1e-4, atol=1e-5)
    assert loss_t == pytest.approx(loss_r, rel=1e-5)
    for n, g in grads_r.items():
        assert g.abs().max() > 0, n
        torch.testing.assert_close(grads_t[n], g, rtol=1e-4, atol=1e-6)


def test_plan_cost_follows_the_path_the_step_feeds():
    """Packed micro-batches are charged by real tokens when they go THD, by rows otherwise."""
    from types import SimpleNamespace

    from megatron_amopo.config import TrainingConfig
    from megatron_amopo.training.batches import plan_cost
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
