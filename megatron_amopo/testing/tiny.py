"""Tiny architectures and deterministic weights for tests."""

from __future__ import annotations

import zlib

import torch

from megatron_amopo.convert.tiny_hf import tiny_hf_config
from megatron_amopo.data.batch import Group
from megatron_amopo.model.architectures import ModelArch, arch_from_hf_config
from megatron_amopo.model.sharding import local_parameters, tp_split_dim


def tiny_arch(model_type: str = "qwen2", **overrides) -> ModelArch:
    return arch_from_hf_config(tiny_hf_config(model_type, **overrides))


def _full_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    shape = list(param.shape)
    dim = tp_split_dim(param)
    if dim is not None:
        shape[dim] *= tp_size
    return shape


@torch.no_grad()
def fill_deterministic(model: torch.nn.Module, seed: int, tp_rank: int, tp_size: int) -> None:
    """Give every parameter a value that depends only on (seed, full name, full shape).

    Each rank computes its shard from the full tensor, so any TP/PP layout gets the
    same model without communication.
    """
    from megatron_amopo.model.sharding import shard_tensor

    for _, full, param in local_parameters(model):
        if full == "output_layer.weight" and getattr(param, "shared", False):
            full = "embedding.word_embeddings.weight"  # tied copy on the last stage
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full.encode()))
        shape = _full_shape(param, tp_size)
        value = torch.randn(shape, generator=gen, dtype=torch.float32)
        value = 1.0 + 0.1 * value if "norm" in full else 0.05 * value
        param.copy_(shard_tensor(value, full, tp_split_dim(param), tp_rank, tp_size).to(param.dtype))


def hand_groups(num_groups: int, num_pairs: int, vocab: int, seed: int) -> list[Group]:
    """Preference groups in the reader's format with random tokens and lengths."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(num_groups):
        prompt_len = int(torch.randint(3, 6, (1,), generator=gen))
        seqs, starts = [], []
        for _ in range(2 * num_pairs):
            length = prompt_len + int(torch.randint(2, 7, (1,), generator=gen))
            seqs.append(torch.randint(1, vocab, (length,), generator=gen))
            starts.append(prompt_len)
        groups.append(
            Group(
                tokens=seqs,
                response_start=torch.tensor(starts),
                chosen_scores=torch.ones(num_pairs - 1),
                rejected_scores=torch.zeros(num_pairs - 1),
                row_id=g,
                group_id=100 + g,
            )
        )
    return groups


def logprob_inputs(seed=0, shape=(3, 11), vocab=53, dtype=torch.float32):
    """Random logits [*shape, vocab], labels and a loss mask (about 70% ones) for log-prob tests."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    mask = (torch.rand(shape, generator=gen) > 0.3).float()
    return logits, labels, mask


def reference_logprobs(logits, labels, mask):
    """log p(label) from ``log_softmax`` over the full vocabulary, 0 outside the mask: the naive reference."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return logp * (mask > 0)
