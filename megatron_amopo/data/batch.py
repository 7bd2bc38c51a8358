"""Planned micro-batch (list of groups from PreferenceGroupDataset) -> model input tensors.

Legend: B groups in the micro-batch, P pairs, N = B * 2P sequences, R rows, S row length.
Sequence index within the micro-batch n = b * 2P + 2 * k + side, so any per-sequence statistic
of shape [N] reshapes to [B, P, 2] (side 0 chosen, 1 rejected).

Shift as in Megatron GPT: a stored sequence x of L tokens gives inputs x[:-1] and labels x[1:]
(L - 1 positions); loss_mask is 1 where the label is a response token (index >= response_start).

Layouts:
  padded  one sequence per row, R = N.
  packed  sequences laid end to end in R rows of W <= S positions, attention block-diagonal
          across sequences, position ids restarting at 0 per sequence. Which sequences share a
          row, and W (the fullest row): the ROW RULE of megatron_amopo.data.packing (best fit
          decreasing into rows of S, or longest-processing-time into fewer, balanced rows,
          whichever gives the least R * W); within a row in placement order. The planner
          (cost="packed") charges a micro-batch exactly R * W, the tensor built here.

``attention_mask`` follows Megatron: bool [R, 1, S, S], True = masked (not attended). Real
tokens see only earlier tokens of their own sequence. A padding query sees only itself, so no
row of the mask is fully masked (a fully masked softmax row is NaN in -inf based kernels);
no real token ever sees padding.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_amopo.data.packing import pack_rows

LAYOUTS = ("padded", "packed")


def _shifted(groups: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    inputs, labels, masks = [], [], []
    for g in groups:
        for seq, start in zip(g["tokens"], g["response_start"].tolist()):
            x = seq.to(torch.int64)
            inputs.append(x[:-1])
            labels.append(x[1:])
            # label j is token j+1; it is a response token when j + 1 >= response_start
            masks.append((torch.arange(1, len(x)) >= start).float())
    return inputs, labels, masks


def _place(lengths: list[int], S: int, layout: str) -> list[list[int]]:
    """Row assignment: a list of sequence indices per row.

    packed: the ROW RULE (``packing.pack_rows``) the planner charges a packed micro-batch by, so
    a planned micro-batch gets exactly the planned rows and width.
    """
    if layout == "padded":
        return [[n] for n in range(len(lengths))]
    return pack_rows(lengths, S)


def build_micro_batch(
    groups: list[dict], layout: str = "padded", seq_length: Optional[int] = None, pad_id: int = 0
) -> dict:
    """Model inputs for the planned micro-batch ``groups`` (see the module docstring for the layout).

    ``seq_length`` is the row length S (default: the longest sequence's positions for padded,
    required for packed, where it caps the rows: they are W <= S positions, W = the fullest
    row). Returns tokens/labels/position_ids/segment_ids [R, W] int64 (W = S for padded),
    loss_mask [R, W] float, attention_mask [R, 1, W, W] bool, cu_seqlens [R, M + 1] int32 (row-local
    boundaries, padded by repeating the last value; M = most sequences in a row), num_segments [R],
    seq_row/seq_offset/seq_lengths [N], num_seqs (0-dim), group_ids/row_ids [B], chosen_scores and
    rejected_scores [B, D].
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not groups:
        raise ValueError("a micro-batch needs at least one group")
    inputs, labels, masks = _shifted(groups)
    lengths = [len(x) for x in inputs]
    S = seq_length if seq_length is not None else max(lengths)
    if layout == "packed" and seq_length is None:
        raise ValueError("the packed layout needs seq_length (the row length S)")
    if max(lengths) > S:
        raise ValueError(
            f"a sequence has {max(lengths)} positions, more than the row length {S}; "
            "the dataset was built for a longer --seq-length"
        )
    rows = _place(lengths, S, layout)
    if layout == "packed":  # rows of W <= S positions: W is the fullest row
        S = max(sum(lengths[n] for n in r) for r in rows)
    R, N = len(rows), len(lengths)
    out = {
        "tokens": torch.full((R, S), pad_id, dtype=torch.int64),
        "labels": torch.full((R, S), pad_id, dtype=torch.int64),
        "loss_mask": torch.zeros((R, S), dtype=torch.float32),
        "position_ids": torch.zeros((R, S), dtype=torch.int64),
        "segment_ids": torch.full((R, S), -1, dtype=torch.int64),
    }
    seq_row, seq_offset = torch.zeros(N, dtype=torch.int64), torch.zeros(N, dtype=torch.int64)
    M = max(len(r) for r in rows)
    cu = torch.zeros((R, M + 1), dtype=torch.int32)
    for r, members in enumerate(rows):
        col = 0
        for j, n in enumerate(members):
            end = col + lengths[n]
            out["tokens"][r, col:end] = inputs[n]
            out["labels"][r, col:end] = labels[n]
            out["loss_mask"][r, col:end] = masks[n]
            out["position_ids"][r, col:end] = torch.arange(lengths[n])
            out["segment_ids"][r, col:end] = n
            seq_row[n], seq_offset[n] = r, col
            cu[r, j + 1] = end
            col = end
        cu[r, len(members) + 1 :] = col
    out["attention_mask"] = attention_mask_from_segments(out["segment_ids"])
    out.update(
        cu_seqlens=cu,
        num_segments=torch.tensor([len(r) for r in rows], dtype=torch.int64),
        seq_row=seq_row,
        seq_offset=seq_offset,
        seq_lengths=torch.tensor(lengths, dtype=torch.int64),
        num_seqs=torch.tensor(N, dtype=torch.int64),
        group_ids=torch.tensor([g["group_id"] for g in groups], dtype=torch.int64),
        row_ids=torch.tensor([g["row_id"] for g in groups], dtype=torch.int64),
        chosen_scores=torch.stack([g["chosen_scores"] for g in groups]),
        rejected_scores=torch.stack([g["rejected_scores"] for g in groups]),
    )
    return out


def attention_mask_from_segments(segment_ids_RS: torch.Tensor) -> torch.Tensor:
    """bool [R, 1, S, S], True = masked: causal within a segment; padding (-1) sees only itself."""
    S = segment_ids_RS.shape[1]
    q, k = segment_ids_RS[:, :, None], segment_ids_RS[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    allowed = (q == k) & (q >= 0) & causal
    allowed |= torch.eye(S, dtype=torch.bool) & (q < 0)
    return (~allowed)[:, None]
