"""Micro-batch builder: padded and packed layouts carry the same sequences, labels and masks."""

from pathlib import Path

import pytest
import torch

from megatron_amopo.data.batch import attention_mask_from_segments, build_micro_batch
from megatron_amopo.data.config import DataConfig, PreprocessConfig, PromptConfig
from megatron_amopo.data.packing import pack_rows, packed_rows, packed_shape
from megatron_amopo.data.planner import plan_microbatches
from megatron_amopo.data.preprocess import preprocess
from megatron_amopo.data.reader import PreferenceGroupDataset
from megatron_amopo.testing import planner_reference

ROOT = Path(__file__).resolve().parents[2]
TOK = str(ROOT / "data" / "tokenizer-qwen2")
UF = str(ROOT / "data" / "ultrafeedback" / "train_rows_200.jsonl")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "uf"
    pre = PreprocessConfig(input=UF, output=str(out), tokenizer=TOK, limit=12, progress=False)
    preprocess(DataConfig(format="pairs", seq_length=512), PromptConfig(), pre)
    return PreferenceGroupDataset(str(out))


def _per_sequence(batch):
    """{sequence index: (tokens, labels, loss_mask, position_ids)} read back through segment_ids."""
    out = {}
    for n in range(batch.num_seqs):
        sel = batch.segment_ids == n
        out[n] = tuple(getattr(batch, k)[sel] for k in ("tokens", "labels", "loss_mask", "position_ids"))
    return out


def test_padded_packed_and_thd_agree(ds):
    groups = [ds[g] for g in range(min(3, len(ds)))]
    B, P = len(groups), ds.num_pairs
    padded = build_micro_batch(groups, "padded", seq_length=512, pad_id=151643)
    packed = build_micro_batch(groups, "packed", seq_length=512, pad_id=151643)
    thd = build_micro_batch(groups, "packed", seq_length=512, pad_id=151643, thd=True)
    N = B * 2 * P
    assert padded.tokens.shape == (N, 512) and padded.num_seqs == N == packed.num_seqs == thd.num_seqs
    assert packed.tokens.shape[0] < N  # sequences share rows
    a, b, c = _per_sequence(padded), _per_sequence(packed), _per_sequence(thd)
    for n in range(N):
        g, k, side = n // (2 * P), (n % (2 * P)) // 2, n % 2
        seq = groups[g].tokens[2 * k + side]
        start = int(groups[g].response_start[2 * k + side])
        for x, y, z in zip(a[n], b[n], c[n]):
            assert torch.equal(x, y) and torch.equal(x, z)
        tokens, labels, mask, pos = a[n]
        assert torch.equal(tokens, seq[:-1]) and torch.equal(labels, seq[1:])
        assert torch.equal(pos, torch.arange(len(seq) - 1))
        assert int(mask.sum()) == len(seq) - start and mask[start - 1] == 1 and mask[start - 2] == 0
    # per-sequence statistics reshape to [B, P, 2]
    resp_tokens = torch.stack([a[n][2].sum() for n in range(N)]).view(B, P, 2)
    assert resp_tokens[0, 1, 0] == len(groups[0].tokens[2]) - int(groups[0].response_start[2])
    for batch in (padded, packed):
        pad = batch.segment_ids < 0
        assert pad.any() and batch.loss_mask[pad].sum() == 0 and torch.all(batch.tokens[pad] == 151643)
        assert batch.attention_mask is not None and not batch.thd
    assert packed.sample_ids.tolist() == [g.group_id for g in groups] == thd.sample_ids.tolist()
    assert packed.seq_lengths == thd.seq_lengths == tuple(len(s) - 1 for g in groups for s in g.tokens)
    # THD: one stream of every sequence in order, cu_seqlens the running sum of the lengths, no mask
    assert thd.thd and thd.attention_mask is None and thd.tokens.shape == (1, sum(thd.seq_lengths))
    assert thd.cu_seqlens.dtype == torch.int32 and thd.max_seqlen == max(thd.seq_lengths)
    assert thd.cu_seqlens.tolist() == [0] + torch.tensor(thd.seq_lengths).cumsum(0).tolist()
    assert thd.segment_ids[0].tolist() == [n for n, L in enumerate(thd.seq_lengths) for _ in range(L)]


def test_thd_stream_padded_to_a_multiple(ds):
    """Sequence parallelism: T rounded up with one padding segment (segment -1, loss mask 0) that
    counts as one more THD sequence."""
    groups = [ds[g] for g in range(min(2, len(ds)))]
    plain = build_micro_batch(groups, "packed", seq_length=512, thd=True)
    T = plain.tokens.shape[1]
    multiple = next(m for m in (7, 11, 13) if T % m)
    padded = build_micro_batch(groups, "packed", seq_length=512, thd=True, pad_to_multiple=multiple)
    T_pad = padded.tokens.shape[1]
    assert T_pad % multiple == 0 and T < T_pad < T + multiple
    assert padded.cu_seqlens.tolist() == plain.cu_seqlens.tolist() + [T_pad]
    assert (padded.segment_ids[0, T:] == -1).all() and padded.loss_mask[0, T:].sum() == 0
    assert padded.position_ids[0, T:].tolist() == list(range(T_pad - T))
    for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert torch.equal(getattr(padded, k)[:, :T], getattr(plain, k)), k
    assert build_micro_batch(groups, "padded", thd=True).attention_mask is not None  # padded rows stay rows
    with pytest.raises(ValueError, match="pad_to_multiple"):
        build_micro_batch(groups, "packed", seq_length=512, thd=True, pad_to_multiple=0)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_rows_padded_to_a_multiple(ds, layout):
    """Sequence parallelism on the mask path: every row's width rounded up, the extra positions padding."""
    groups = [ds[g] for g in range(min(2, len(ds)))]
    plain = build_micro_batch(groups, layout, seq_length=512)
    W = plain.tokens.shape[1]
    multiple = next(m for m in (2, 3, 7, 11) if W % m)
    padded = build_micro_batch(groups, layout, seq_length=512, pad_to_multiple=multiple)
    W_pad = padded.tokens.shape[1]
    assert W_pad % multiple == 0 and W < W_pad < W + multiple and padded.tokens.shape[0] == plain.tokens.shape[0]
    for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert torch.equal(getattr(padded, k)[:, :W], getattr(plain, k)), k
    assert (padded.segment_ids[:, W:] < 0).all() and padded.loss_mask[:, W:].sum() == 0
    assert torch.equal(padded.attention_mask[:, :, :W, :W], plain.attention_mask)
    assert padded.attention_mask[:, :, W:, :W].all()  # padding sees no real token


def test_to_device_moves_every_tensor_and_keeps_host_fields(ds):
    batch = build_micro_batch([ds[0]], "packed", seq_length=512, thd=True, epoch=3)
    moved = batch.to("meta")
    for f in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "sample_ids", "cu_seqlens"):
        assert getattr(moved, f).device.type == "meta", f
    assert moved.seq_lengths == batch.seq_lengths and moved.epoch == 3 and moved.max_seqlen == batch.max_seqlen
    assert batch.tokens.device.type == "cpu"  # a copy


def test_attention_mask_convention():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    masked = attention_mask_from_segments(seg)
    assert masked.shape == (1, 1, 6, 6) and masked.dtype == torch.bool
    allowed = ~masked[0, 0]
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expect)  # causal, block-diagonal; padding sees only itself


def test_packed_rows_respect_length_and_errors(ds):
    groups = [ds[g] for g in range(min(4, len(ds)))]
    longest = max(len(s) - 1 for g in groups for s in g.tokens)
    batch = build_micro_batch(groups, "packed", seq_length=longest)
    assert batch.tokens.shape[1] == longest
    assert int((batch.segment_ids >= 0).sum()) == sum(len(s) - 1 for g in groups for s in g.tokens)
    seg = batch.segment_ids
    sees = ~batch.attention_mask[:, 0]  # [R, S, S] query x key
    assert not (sees & (seg >= 0)[:, :, None] & (seg < 0)[:, None, :]).any()  # no real token sees padding
    assert not (sees & (seg[:, :, None] != seg[:, None, :])).any()  # nor another sequence
    with pytest.raises(ValueError, match="more than the row length"):
        build_micro_batch(groups, "padded", seq_length=longest - 1)
    with pytest.raises(ValueError, match="packed layout needs seq_length"):
        build_micro_batch(groups, "packed")


@pytest.mark.parametrize("backend", [None, planner_reference], ids=["cpp", "reference"])
def test_builder_uses_the_rows_the_planner_charged(ds, backend):
    """Packed plans of real groups: each built micro-batch is exactly the [R, W] the planner's
    rule charges (R * W <= budget, W <= seq_length), and its rows are pack_rows' rows."""
    S, seq_lens_GS = 512, ds.group_seq_lens
    assert seq_lens_GS.shape == (len(ds), 2 * ds.num_pairs)
    budget = 3 * max(packed_rows(row, S) for row in seq_lens_GS) * S + 100
    plan = plan_microbatches(
        seq_lens=seq_lens_GS,
        seqs_per_group=2 * ds.num_pairs,
        num_epochs=2,
        seed=5,
        dp_rank=0,
        dp_size=1,
        token_budget=budget,
        cost="packed",
        seq_length=S,
        backend=backend,
    )
    assert plan.num_microbatches >= 2 and len(plan.group_ids) == 2 * len(ds)
    for m in range(plan.num_microbatches):
        gids = plan.microbatch(m).tolist()
        batch = build_micro_batch([ds[g] for g in gids], "packed", seq_length=S)
        lens = seq_lens_GS[gids].ravel().tolist()
        assert list(batch.seq_lengths) == lens
        rows = pack_rows(lens, S)
        R, W = packed_shape(lens, S)
        assert tuple(batch.tokens.shape) == (len(rows), W) == (R, max(sum(lens[n] for n in r) for r in rows))
        assert budget >= R * W and W <= S and batch.attention_mask.shape == (R, 1, W, W)
        for r, members in enumerate(rows):
            assert batch.segment_ids[r].unique_consecutive().tolist()[: len(members)] == members
