"""THD bookkeeping: packed micro-batch rows [R, S] -> one stream [1, T] plus ``PackedSeqParams``.

The stream keeps every row's real tokens in row-major order with labels, loss mask, position ids
and segment ids, so the per-sequence statistics are the same as from the rows; see
docs/DESIGN.md, "Packed sequences as THD".

Shape legend: R rows, S positions per row, T packed tokens, K segments (sequences, plus
the padding segment if any).
"""

from __future__ import annotations

import torch

# Keys laid out along the positions of a row; everything else in a batch is per sample or
# per sequence and passes through unchanged.
ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")
PAD_SEGMENT = -1


def cu_seqlens_from_segments(segment_ids_T: torch.Tensor) -> torch.Tensor:
    """int32 [K + 1]: offsets where the segment id changes, from 0 to T (one entry per run)."""
    if segment_ids_T.dim() != 1:
        raise ValueError(f"segment ids must be one stream [T], got shape {tuple(segment_ids_T.shape)}")
    T = segment_ids_T.numel()
    if T == 0:
        raise ValueError("a packed stream needs at least one token")
    starts = (segment_ids_T[1:] != segment_ids_T[:-1]).nonzero().squeeze(1) + 1
    zero, end = starts.new_zeros(1), starts.new_full((1,), T)
    return torch.cat([zero, starts, end]).to(torch.int32)


def _check_rows(batch: dict) -> None:
    missing = [k for k in ROW_KEYS if k not in batch]
    if missing:
        raise KeyError(f"micro-batch lacks {missing}; build it with megatron_amopo.data.batch.build_micro_batch")
    seg_RS = batch["segment_ids"]
    if seg_RS.dim() != 2:
        raise ValueError(f"to_thd takes rows [R, S]; segment_ids has shape {tuple(seg_RS.shape)}")
    real_RS = seg_RS >= 0
    # Real tokens must come first in each row (the builder pads at the end): otherwise the
    # stream would not keep each sequence contiguous.
    if bool((real_RS[:, 1:] & ~real_RS[:, :-1]).any()):
        raise ValueError("to_thd: a row has real tokens after padding; rows must be padded at the end only")
    if bool((batch["loss_mask"][~real_RS] != 0).any()):
        raise ValueError("to_thd: loss_mask is non-zero on padding (segment id -1)")


def to_thd(batch: dict, pad_to_multiple: int = 1) -> dict:
    """Rows [R, S] -> one stream [1, T] with ``cu_seqlens`` [K + 1] and ``max_seqlen``.

    Row keys (``ROW_KEYS``) become [1, T] with padding dropped; ``attention_mask`` becomes
    None (THD attention needs none); other keys are kept. With ``pad_to_multiple`` > 1, T
    is rounded up with one padding segment (e.g. to the TP size for sequence parallelism).
    Every segment must be one whole sequence: a sequence split across rows or repeated
    would be a different THD sequence, and is refused.
    """
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    _check_rows(batch)
    real_RS = batch["segment_ids"] >= 0
    out = {k: v for k, v in batch.items() if k not in ROW_KEYS + ("attention_mask", "cu_seqlens")}
    for k in ROW_KEYS:
        out[k] = batch[k][real_RS]
    cu = cu_seqlens_from_segments(out["segment_ids"])
    seg_K = out["segment_ids"][cu[:-1].long()]
    if seg_K.unique().numel() != seg_K.numel():
        raise ValueError("to_thd: a sequence (segment id) appears in more than one run of tokens")
    T = out["tokens"].numel()
    pad = -T % pad_to_multiple
    if pad:
        fill = {"segment_ids": PAD_SEGMENT, "loss_mask": 0}
        for k in ROW_KEYS:
            value = fill.get(k, 0)
            tail = out[k].new_full((pad,), value)
            if k == "position_ids":
                tail = torch.arange(pad, dtype=out[k].dtype, device=out[k].device)
            out[k] = torch.cat([out[k], tail])
        cu = torch.cat([cu, cu.new_full((1,), T + pad)])
    for k in ROW_KEYS:
        out[k] = out[k][None]
    lengths_K = cu[1:] - cu[:-1]
    out.update(cu_seqlens=cu, max_seqlen=int(lengths_K.max()), attention_mask=None)
    return out


def packed_seq_params_from_batch(batch: dict):
    """Megatron ``PackedSeqParams`` (qkv_format "thd") for a batch made by ``to_thd``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch.get("cu_seqlens")
    if cu is None or cu.dim() != 1 or "max_seqlen" not in batch:
        raise ValueError(
            "packed_seq_params_from_batch needs a THD batch (1-D cu_seqlens and max_seqlen); the builder's "
            "rows carry cu_seqlens per row [R, M + 1]: flatten them with to_thd(batch) first"
        )
    cu = cu.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(batch["max_seqlen"]),
        max_seqlen_kv=int(batch["max_seqlen"]),
    )
