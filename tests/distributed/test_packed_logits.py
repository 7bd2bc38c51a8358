"""Packed rows (block-diagonal mask, positions restarting per sequence) give exactly the
logits of the same sequences laid one per row, on the real Megatron-Core model (local spec)."""

from __future__ import annotations

import torch

from megatron_amopo.testing import run_multirank


def _logits_per_sequence(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(batch.tokens, batch.position_ids, batch.attention_mask)
    return [logits[batch.segment_ids == n] for n in range(batch.num_seqs)]  # each sequence's positions in order


def _body():
    from megatron_amopo.config import ParallelConfig
    from megatron_amopo.data.batch import build_micro_batch
    from megatron_amopo.model.build import build_model
    from megatron_amopo.model.provider import transformer_config
    from megatron_amopo.runtime.distributed import initialize_distributed, set_seed
    from megatron_amopo.testing.tiny import fill_deterministic, hand_groups, tiny_arch

    parallel = ParallelConfig()
    initialize_distributed(parallel)
    set_seed(0)
    arch = tiny_arch()
    (model,) = build_model(arch, transformer_config(arch, parallel))
    fill_deterministic(model, 11, 0, 1)
    model.eval()
    groups = hand_groups(3, 2, arch.vocab_size, seed=4)
    padded = build_micro_batch(groups, layout="padded")
    packed = build_micro_batch(groups, layout="packed", seq_length=24)
    assert packed.tokens.shape[0] < padded.tokens.shape[0]  # really several sequences per row
    a, b = _logits_per_sequence(model, padded), _logits_per_sequence(model, packed)
    return max((x - y).abs().max().item() for x, y in zip(a, b)), len(a)


def test_packed_rows_give_the_logits_of_separate_sequences():
    ((max_diff, num_seqs),) = run_multirank(_body, 1, timeout=180)
    assert num_seqs == 12
    assert max_diff <= 1e-5
