"""Hugging Face vs Megatron-Core logits on a few prompts (fp32, CPU).

Megatron runs each prompt unpadded (its RoPE always uses positions 0..S-1); HF runs
each prompt alone and also as one left-padded batch with an attention mask, which
agrees because RoPE scores depend only on relative positions.

Shape legend: S prompt length, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Preference optimisation aligns a language model with several objectives at once, such as",
    "1, 2, 3, 5, 8,",
)
_RANDOM_LENGTHS = (5, 11, 17, 8)


def prompt_token_ids(tokenizer_dir: Optional[str], vocab_size: int) -> list[list[int]]:
    """Token ids of ``PROMPTS`` with the model's tokenizer, or fixed pseudo-random ids without one."""
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        if max(max(s) for s in ids) < vocab_size:
            return ids
    gen = torch.Generator().manual_seed(20240607)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in _RANDOM_LENGTHS]


@torch.no_grad()
def hf_logits(model, seqs: list[list[int]], padded: bool) -> list[torch.Tensor]:
    """Per prompt logits_SV: each prompt alone, or all in one left-padded batch."""
    if not padded:
        return [model(torch.tensor([s])).logits[0].float() for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(s)
        mask[b, width - len(s) :] = 1
    logits_BSV = model(input_ids=ids, attention_mask=mask).logits.float()
    return [logits_BSV[b, width - len(s) :] for b, s in enumerate(seqs)]


@torch.no_grad()
def megatron_logits(model_chunk, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt full-vocabulary logits_SV at any TP/PP layout, returned on every rank of the
    model-parallel group (each prompt is one forward-only pass through Megatron's schedule)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_amopo.training.engine import Engine

    captured: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)  # [1, S]
        output = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)

        def loss_func(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[0]
            captured.append(full.float().clone())
            return logits.sum() * 0.0, {}

        return output, loss_func

    engine = Engine([model_chunk], forward_step)
    out: list[torch.Tensor] = []
    for s in seqs:
        captured.clear()
        engine.forward_backward([torch.tensor([s])], forward_only=True)
        holder: list[Any] = [captured[0] if captured else None]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(
                holder, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
            )
        out.append(holder[0])
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """max / mean |Δlogit| and the fraction of positions with the same argmax."""
    diff = torch.cat([(a - b).abs().reshape(-1) for a, b in zip(ref, got)])
    agree = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(ref, got)])
    return dict(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        argmax_agreement=agree.mean().item(),
        positions=agree.numel(),
    )


def check_against_hf(hf_dir: str, root: str, iteration: Optional[int] = None) -> dict:
    """Load the HF model in ``hf_dir`` and the checkpoint ``root`` in fp32 and compare logits
    (unpadded and left-padded). Needs Megatron at TP1/PP1. Holds both models."""
    from transformers import AutoModelForCausalLM

    from megatron_amopo.checkpoint import store
    from megatron_amopo.convert.runtime import build_full_model
    from megatron_amopo.runtime.distributed import set_seed

    set_seed(1234)  # Megatron's attention forks its model-parallel RNG stream (dropout is off)
    meta = store.read_model_metadata(root)
    model = build_full_model(meta.arch, torch.float32)
    it = store.load_model_state(model, root, iteration)
    model.eval()
    seqs = prompt_token_ids(meta.tokenizer_dir, meta.arch.vocab_size)
    got = megatron_logits(model, seqs)
    del model
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report: dict[str, Any] = {"iteration": it, "prompts": len(seqs)}
    for key, padded in (("unpadded", False), ("left_padded", True)):
        report[key] = compare(hf_logits(hf, seqs, padded), got)
    report["max_abs"] = max(report["unpadded"]["max_abs"], report["left_padded"]["max_abs"])
    return report


def report_check(report: dict, threshold: float) -> int:
    """Print a ``check_against_hf`` report; exit status 1 when max |Δlogit| is over ``threshold``."""
    import json
    import sys

    print(json.dumps(report, indent=1))
    if not report["max_abs"] <= threshold:
        print(f"check FAILED: max |Δlogit| {report['max_abs']:.3g} > {threshold:g}", file=sys.stderr)
        return 1
    print(f"check passed: max |Δlogit| {report['max_abs']:.3g} <= {threshold:g}")
    return 0
