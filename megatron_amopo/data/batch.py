"""Planned micro-batch (``Group``s from ``PreferenceGroupDataset``) -> ``MicroBatch``, the step's input.

Built once in the form the model takes: rows with an attention mask (padded, or packed rows on
the mask path), or one THD stream with ``cu_seqlens`` (packed, where attention takes THD), so the
step never converts. Layouts, shift and mask conventions: docs/DESIGN.md, "The micro-batch layout of
the 2(D+1) sequences"; shape letters: its "Shape letters".
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from megatron_amopo.config import BatchLayout
from megatron_amopo.data.packing import pack_rows

LAYOUTS = typing.get_args(BatchLayout)
PAD_SEGMENT = -1


@dataclass
class Group:
    """One preference group (a sample) as the reader yields it: its 2P sequences and scores.

    Sequence 2k + side is pair k's chosen (side 0) or rejected (side 1) response after its prompt.
    """

    tokens: list[torch.Tensor]  # 2P int64 tensors [L]: prompt then response tokens of each sequence
    response_start: torch.Tensor  # int64 [2P]: index of each sequence's first response token
    chosen_scores: torch.Tensor  # [D]: scores of the chosen response
    rejected_scores: torch.Tensor  # [D]: scores of the rejected response
    row_id: int  # input row the group was built from
    group_id: int  # index in the dataset: the sample id, key of the Gaussian draws


@dataclass
class MicroBatch:
    """One micro-batch as ``training.step`` consumes it (the role ``PackedSeqParams`` plays in Megatron).

    Rows: the sequence tensors are [R, S] and ``attention_mask`` is set. THD: they are one stream
    [1, T], ``cu_seqlens`` / ``max_seqlen`` are set and ``attention_mask`` is None. Sequence
    n = b * 2P + 2k + side (side 0 chosen, 1 rejected). Host fields need no device sync.
    """

    tokens: torch.Tensor  # int64 [R, S] | [1, T]: inputs x[:-1] of each sequence x
    labels: torch.Tensor  # int64, as tokens: x[1:]
    loss_mask: torch.Tensor  # float32, as tokens: 1 where the label is a response token
    position_ids: torch.Tensor  # int64, as tokens: restarting at 0 per sequence
    segment_ids: torch.Tensor  # int64, as tokens: sequence index n, -1 on padding
    sample_ids: torch.Tensor  # int64 [B]: global sample ids, the key of the Gaussian draws
    seq_lengths: tuple[int, ...]  # host [N]: positions of each sequence (after the shift)
    layout: BatchLayout = "padded"  # host: one sequence per row, or several
    epoch: int = 0  # host: epoch of the samples, part of the key of their Gaussian draws
    attention_mask: Optional[torch.Tensor] = None  # bool [R, 1, S, S], True = masked; rows only
    cu_seqlens: Optional[torch.Tensor] = None  # int32 [K + 1]: segment starts and T; THD only
    max_seqlen: Optional[int] = None  # host: longest segment; THD only

    @property
    def num_seqs(self) -> int:
        """N, the sequences of the micro-batch (2P per sample)."""
        return len(self.seq_lengths)

    @property
    def thd(self) -> bool:
        """Whether the sequence tensors are one THD stream (then ``cu_seqlens`` says where each starts)."""
        return self.cu_seqlens is not None

    def pin_memory(self) -> MicroBatch:
        """A copy with every tensor in pinned host memory (DataLoader's ``pin_memory`` calls this), so
        that ``to`` copies it to the GPU asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: Union[torch.device, str], non_blocking: bool = True) -> MicroBatch:
        """A copy with every tensor on ``device`` (asynchronous from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MicroBatch:
        moved: dict[str, Any] = {
            f.name: fn(v) for f in dataclasses.fields(self) if torch.is_tensor(v := getattr(self, f.name))
        }
        return dataclasses.replace(self, **moved)


def _shifted(groups: list[Group]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    inputs, labels, masks = [], [], []
    for g in groups:
        for seq, start in zip(g.tokens, g.response_start.tolist()):
            x = seq.to(torch.int64)
            inputs.append(x[:-1])
            labels.append(x[1:])
            # label j is token j+1; it is a response token when j + 1 >= response_start
            masks.append((torch.arange(1, len(x)) >= start).float())
    return inputs, labels, masks


def build_micro_batch(
    groups: list[Group],
    layout: BatchLayout = "padded",
    seq_length: Optional[int] = None,
    pad_id: int = 0,
    *,
    thd: bool = False,
    pad_to_multiple: int = 1,
    epoch: int = 0,
) -> MicroBatch:
    """The ``MicroBatch`` of the planned micro-batch ``groups``.

    ``seq_length`` caps the positions of a sequence (default: the longest; required for packed).
    padded: one sequence per row, R = N rows of the longest sequence's positions. packed, rows:
    the ROW RULE's R rows of W <= ``seq_length`` (``packing.pack_rows``, what the planner charged).
    packed with ``thd``: sequences end to end in one stream (T positions, one padding segment last).
    The row width (or T) is rounded up to ``pad_to_multiple``: the TP size under sequence parallelism.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not groups:
        raise ValueError("a micro-batch needs at least one group")
    if layout == "packed" and seq_length is None:
        raise ValueError("the packed layout needs seq_length (the row length S)")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    inputs, labels, masks = _shifted(groups)
    lengths = [len(x) for x in inputs]
    cap = seq_length if seq_length is not None else max(lengths)
    if max(lengths) > cap:
        raise ValueError(
            f"a sequence has {max(lengths)} positions, more than the row length {cap}; "
            "the dataset was built for a longer --seq-length"
        )
    if layout == "padded":
        rows = [[n] for n in range(len(lengths))]
    elif thd:
        rows = [list(range(len(lengths)))]  # one stream: every sequence in order
    else:
        rows = pack_rows(lengths, cap)
    width = cap if layout == "padded" else max(sum(lengths[n] for n in r) for r in rows)
    width += -width % pad_to_multiple  # sequence parallelism splits every row (or the stream) over TP ranks
    seqs: dict[str, Any] = _fill(rows, width, inputs, labels, masks, pad_id)
    batch = MicroBatch(
        **seqs,
        sample_ids=torch.tensor([g.group_id for g in groups], dtype=torch.int64),
        seq_lengths=tuple(lengths),
        layout=layout,
        epoch=epoch,
    )
    if not (layout == "packed" and thd):
        batch.attention_mask = attention_mask_from_segments(batch.segment_ids)
        return batch
    real = sum(lengths)
    seg_K = lengths + ([width - real] if width > real else [])  # the padding segment last
    batch.position_ids[0, real:] = torch.arange(width - real)
    batch.cu_seqlens = torch.tensor([0] + seg_K, dtype=torch.int64).cumsum(0).to(torch.int32)
    batch.max_seqlen = max(seg_K)
    return batch


def _fill(rows: list[list[int]], width: int, inputs, labels, masks, pad_id: int) -> dict[str, torch.Tensor]:
    """Sequence tensors [R, width]: row r holds ``rows[r]``'s sequences end to end, then padding
    (segment -1, loss mask 0, position 0)."""
    R = len(rows)
    out = {
        "tokens": torch.full((R, width), pad_id, dtype=torch.int64),
        "labels": torch.full((R, width), pad_id, dtype=torch.int64),
        "loss_mask": torch.zeros((R, width), dtype=torch.float32),
        "position_ids": torch.zeros((R, width), dtype=torch.int64),
        "segment_ids": torch.full((R, width), PAD_SEGMENT, dtype=torch.int64),
    }
    for r, members in enumerate(rows):
        col = 0
        for n in members:
            end = col + len(inputs[n])
            out["tokens"][r, col:end] = inputs[n]
            out["labels"][r, col:end] = labels[n]
            out["loss_mask"][r, col:end] = masks[n]
            out["position_ids"][r, col:end] = torch.arange(end - col)
            out["segment_ids"][r, col:end] = n
            col = end
    return out


def attention_mask_from_segments(segment_ids_RS: torch.Tensor) -> torch.Tensor:
    """bool [R, 1, S, S], True = masked: causal within a segment; padding (-1) sees only itself."""
    S = segment_ids_RS.shape[1]
    q, k = segment_ids_RS[:, :, None], segment_ids_RS[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    allowed = (q == k) & (q >= 0) & causal
    allowed |= torch.eye(S, dtype=torch.bool) & (q < 0)
    return (~allowed)[:, None]
