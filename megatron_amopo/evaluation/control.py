"""Controllability: does a requested per-dimension score change what the model writes?

Greedy replies to the same prompts at several requested scores of one dimension, with the
dimension prompt the training data used (``data/prompts.py``, placed as in ``data/tokenization.py``).
For verbosity the measured property is the reply length in tokens; the summary gives the mean
length per requested score and Spearman's rank correlation between requested score and length
over all (prompt, score) replies. Spearman is computed here (ranks with ties averaged, then
Pearson's r of the ranks), not taken from scipy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
from numpy.typing import ArrayLike

from megatron_amopo.data.prompts import PromptBuilder
from megatron_amopo.data.tokenization import pair_messages


def average_ranks(x: ArrayLike) -> np.ndarray:
    """Ranks 1..n of x; tied values share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two equally long samples; NaN when either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two samples of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def summarize_control(replies: Sequence[dict], scores: Sequence[float], resamples: int = 10000, seed: int = 0) -> dict:
    """Mean reply length per requested score, Spearman(score, length), the reply count and, when the
    replies carry ``prompt_index``, Spearman's 95% bootstrap interval over prompts (``spearman_ci``) and
    (with ``text``) how many prompts got the same reply at every score (the dimension prompt changed nothing)."""
    per_level = {}
    for s in scores:
        lengths = [r["length"] for r in replies if r["score"] == s]
        per_level[str(s)] = {
            "mean_length": float(np.mean(lengths)) if lengths else float("nan"),
            "replies": len(lengths),
            "at_max_new_tokens": sum(bool(r["truncated"]) for r in replies if r["score"] == s),
        }
    rho = spearman([r["score"] for r in replies], [r["length"] for r in replies])
    out = {"per_score": per_level, "spearman_score_length": rho, "num_replies": len(replies)}
    if replies and all("prompt_index" in r for r in replies):
        out["spearman_ci95"] = list(spearman_ci(replies, resamples, seed))
    if replies and all("prompt_index" in r and "text" in r for r in replies):
        texts: dict[int, set[str]] = {}
        for r in replies:
            texts.setdefault(r["prompt_index"], set()).add(r["text"])
        out["prompts"] = len(texts)
        out["prompts_same_reply_at_every_score"] = sum(len(t) == 1 for t in texts.values())
    return out


def spearman_ci(
    replies: Sequence[dict], resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of Spearman(score, length) over prompts: each resample draws prompts
    with replacement and keeps all their replies (a prompt's replies are not independent). Resamples in
    which score or length is constant (rho undefined) count as 0, the value of no association."""
    by_prompt: dict[int, list[tuple[float, float]]] = {}
    for r in replies:
        by_prompt.setdefault(int(r["prompt_index"]), []).append((float(r["score"]), float(r["length"])))
    groups = list(by_prompt.values())
    if len(groups) < 2:
        raise ValueError(f"a bootstrap over prompts needs at least 2 prompts, got {len(groups)}")
    rng = np.random.default_rng(seed)
    rhos = np.empty(resamples)
    for i in range(resamples):
        picked = [pt for j in rng.integers(0, len(groups), size=len(groups)) for pt in groups[j]]
        rho = spearman([p[0] for p in picked], [p[1] for p in picked])
        rhos[i] = 0.0 if math.isnan(rho) else rho
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(rhos, [tail, 100 - tail])
    return float(lo), float(hi)


def reply_length(generated: Sequence[int], stop_ids: set[int]) -> tuple[int, bool]:
    """(tokens before the first stop token, whether no stop token came)."""
    for i, t in enumerate(generated):
        if int(t) in stop_ids:
            return i, False
    return len(generated), True


def stop_token_ids(model, tok) -> set[int]:
    """End-of-reply ids: the generation config's EOS ids and the tokenizer's EOS."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if not ids:
        raise ValueError("the model has no end-of-sequence token; reply lengths cannot be measured")
    return ids


def generate_at_scores(
    model,
    tok,
    prompts: Sequence[list[dict]],
    builder: PromptBuilder,
    dimension: str,
    scores: Sequence[float],
    *,
    placement: str = "system",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict]:
    """Greedy replies to each prompt (a list of chat turns) at each requested score of ``dimension``.

    Returns one dict per reply: prompt index, score, length in tokens, whether it hit
    ``max_new_tokens``, and the text.
    """
    import torch

    k = builder.dimensions.index(dimension)
    stop_ids = stop_token_ids(model, tok)
    tok.padding_side = "left"  # decoder-only batches: every prompt ends where generation starts
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    replies, start, done = [], time.time(), 0
    total = len(prompts) * len(scores)
    for score in scores:
        system = builder.dimension(k, score)
        texts = [
            tok.apply_chat_template(pair_messages(system, turns, placement), tokenize=False, add_generation_prompt=True)
            for turns in prompts
        ]
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b : b + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
            for i, row in enumerate(out[:, enc["input_ids"].shape[1] :].tolist()):
                length, truncated = reply_length(row, stop_ids)
                replies.append(
                    {
                        "prompt_index": b + i,
                        "score": score,
                        "length": length,
                        "truncated": truncated,
                        "text": tok.decode(row[:length], skip_special_tokens=True),
                    }
                )
            done += len(out)
            if progress is not None:
                elapsed = time.time() - start
                progress(
                    f"{dimension} {score}: {done}/{total} replies, {elapsed:.0f}s elapsed, "
                    f"ETA {elapsed / done * (total - done):.0f}s"
                )
    return replies
