"""Reader of a preprocessed preference dataset (layout in preprocess.py).

Lengths for the micro-batch planner are in model positions: a stored sequence of L tokens
occupies L - 1 positions of a row after the Megatron GPT shift (inputs x[:-1], labels x[1:]).

Legend: G groups, P pairs per group, D dimensions, N = 2P sequences per group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_amopo.data.batch import Group
from megatron_amopo.data.config import pair_names
from megatron_amopo.data.preprocess import DATA_PREFIX, FORMAT_VERSION


def check_compatible(
    meta: dict,
    path: str,
    *,
    vocab_hash: Optional[str] = None,
    dimensions: Optional[list[str]] = None,
    seq_length: Optional[int] = None,
) -> None:
    """Raise ValueError when the dataset was built for another tokenizer, dimensions or length."""
    redo = "re-run tools/preprocess_data.py for this run's settings"
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: dataset format version {meta.get('format_version')} is not {FORMAT_VERSION}; {redo}")
    if vocab_hash is not None and meta["tokenizer"]["vocab_hash"] != vocab_hash:
        raise ValueError(
            f"{path}: tokenised with tokenizer {meta['tokenizer']['name']!r} (vocab hash "
            f"{meta['tokenizer']['vocab_hash'][:12]}) but this run's tokenizer has vocab hash "
            f"{vocab_hash[:12]}; {redo} with --tokenizer set to the model's tokenizer"
        )
    if dimensions is not None and list(dimensions) != list(meta["dimensions"]):
        raise ValueError(
            f"{path}: built for dimensions {meta['dimensions']} but this run uses "
            f"{list(dimensions)} (same names, same order); {redo} with --dimensions"
        )
    if seq_length is not None and meta["seq_length"] > seq_length:
        raise ValueError(
            f"{path}: sequences were truncated to --seq-length {meta['seq_length']}, longer than "
            f"this run's {seq_length}; {redo} with --seq-length {seq_length}"
        )


class PreferenceGroupDataset(torch.utils.data.Dataset):
    """Groups of 2P sequences as tensors, plus the per-group lengths the batch planner needs."""

    def __init__(
        self,
        path: str,
        *,
        vocab_hash: Optional[str] = None,
        dimensions: Optional[list[str]] = None,
        seq_length: Optional[int] = None,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{path}: no metadata.json; not a dataset written by tools/preprocess_data.py")
        self.meta = json.loads(meta_path.read_text())
        check_compatible(self.meta, str(path), vocab_hash=vocab_hash, dimensions=dimensions, seq_length=seq_length)
        self.num_pairs = int(self.meta["num_pairs"])
        if len(self.pair_names) != self.num_pairs:
            raise ValueError(
                f"{path}: metadata.json names {len(self.pair_names)} pairs but has num_pairs {self.num_pairs}"
            )
        n = 2 * self.num_pairs
        self.indexed = IndexedDataset(str(self.path / DATA_PREFIX))
        docs = np.asarray(self.indexed.document_indices)
        if len(docs) < 1 or not np.all(np.diff(docs) == n):
            raise ValueError(f"{path}: every document must hold {n} sequences (2P); the index is inconsistent")
        num_groups = len(docs) - 1
        self.seq_lengths_GN = np.asarray(self.indexed.sequence_lengths, dtype=np.int64).reshape(num_groups, n)
        self.response_start_GN = np.load(self.path / "response_start.npy").astype(np.int64).reshape(num_groups, n)
        self.chosen_scores_GD = np.load(self.path / "chosen_scores.npy")
        self.rejected_scores_GD = np.load(self.path / "rejected_scores.npy")
        self.row_ids_G = np.load(self.path / "row_ids.npy")
        positions_GN = self.seq_lengths_GN - 1  # after the shift
        self.group_max_len = positions_GN.max(axis=1) if num_groups else np.zeros(0, np.int64)
        self.group_total_len = positions_GN.sum(axis=1)
        self.group_seq_lens = positions_GN  # [G, 2P] per sequence, for the packed planner

    def __len__(self) -> int:
        return len(self.row_ids_G)

    @property
    def dimensions(self) -> list[str]:
        return list(self.meta["dimensions"])

    @property
    def pair_names(self) -> list[str]:
        """The P pair names in layout order (``data.config.pair_names``); older datasets have paper pairs."""
        return list(self.meta.get("pair_names") or pair_names(self.dimensions))

    @property
    def dimension_pairs(self) -> str:
        return str(self.meta.get("dimension_pairs", "paper"))

    def __getitem__(self, g: int) -> Group:
        """Group ``g`` of the dataset (its ``group_id`` is ``g``)."""
        if not 0 <= g < len(self):
            raise IndexError(f"group {g} out of range for {len(self)} groups")
        n = 2 * self.num_pairs
        seqs = self.indexed[g * n : (g + 1) * n]
        return Group(
            tokens=[torch.from_numpy(np.asarray(s, dtype=np.int64)) for s in seqs],
            response_start=torch.from_numpy(self.response_start_GN[g].copy()),
            chosen_scores=torch.from_numpy(self.chosen_scores_GD[g].copy()),
            rejected_scores=torch.from_numpy(self.rejected_scores_GD[g].copy()),
            row_id=int(self.row_ids_G[g]),
            group_id=int(g),
        )
