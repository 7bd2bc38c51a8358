"""The AMoPO objective as pure tensor math (no communication, no device moves).

AMoPO (arXiv 2506.07165) trains on groups of P = D + 1 preference pairs per sample:
pair 0 uses the general prompt, pair k >= 1 the dimension-aware prompt of dimension k
(P = 1 + 2D with mirrored pairs, ``objective/pairs.py``; a masked pair has n = 0).
Each pair's chosen and rejected response enter through per-sequence sufficient
statistics over their response tokens; this module turns them into per-pair
reference-free losses (SimPO or ORPO), adaptive pair weights (paper Sec. 3, Gaussian
weights), per-sample losses and reducible metrics. See docs/OBJECTIVE.md.

Shapes (legend in docs/DESIGN.md): B samples in the micro-batch, P pairs per sample
(general pair first), 2 sides (0 chosen, 1 rejected), E rows of ``pair_sums`` (``PAIR_METRIC_NAMES``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from megatron_amopo.objective.pairs import is_mirrored
from megatron_amopo.objective.rng import counter_normals

if TYPE_CHECKING:  # annotations only: this module imports nothing but torch at run time
    from megatron_amopo.config import AmopoConfig

# ORPO's log(1 - exp(a)) is -inf at a = 0 (every response token has probability 1,
# which float rounding can produce); a is clamped to at most this value inside the
# odds-ratio term only, which bounds that term's slope and keeps it finite.
ORPO_MAX_LOGP = -1e-6

PAIR_METRIC_NAMES = (
    "loss",  # L_k
    "weight",  # w_k used in the loss
    "weight_sq",  # w_k ** 2 (batch spread of the weight)
    "margin",  # beta * (a_c - a_r)
    "accuracy",  # 1[a_c > a_r]
    "logp_chosen",  # a_c
    "logp_rejected",  # a_r
    "weight_mean_mode",  # deterministic softmax(mu_c + mu_r) weight
    "weight_mean_mode_sq",  # its square
)
_ROW = {name: i for i, name in enumerate(PAIR_METRIC_NAMES)}
_GAUSSIAN_MODES = ("gaussian", "gaussian-inverse")


class SequenceStats(NamedTuple):
    """Per-sequence sums over response tokens: each [N] (``logprobs.sequence_stats``), or [B, P, 2]
    (chosen, rejected) after ``pairs``, the shape ``amopo_loss`` takes."""

    sum_logp: torch.Tensor  # sum of token log-probs (carries the gradient)
    n: torch.Tensor  # number of response tokens (int or float)
    sum_p: torch.Tensor  # sum of token probabilities p = exp(logp)
    sum_p2: torch.Tensor  # sum of p ** 2

    def pairs(self, num_pairs: int) -> SequenceStats:
        """[N] -> [B, P, 2]: sequence n = b * 2P + 2k + side (the micro-batch layout)."""
        N = self.sum_logp.numel()
        if N % (2 * num_pairs):
            raise ValueError(
                f"SequenceStats.pairs: {N} sequences is not a multiple of 2P = {2 * num_pairs} "
                f"(P = {num_pairs} pairs per sample, chosen and rejected each)"
            )
        return SequenceStats(*(t.view(-1, num_pairs, 2) for t in self))


def _checked_stats(stats: SequenceStats) -> SequenceStats:
    if not isinstance(stats, SequenceStats):
        raise TypeError(
            f"amopo_loss: stats must be a SequenceStats of [B, P, 2] tensors (logprobs.sequence_stats(...).pairs(P)), "
            f"got {type(stats).__name__}"
        )
    shape = stats.sum_logp.shape
    if len(shape) != 3 or shape[2] != 2:
        raise ValueError(f"amopo_loss: stats tensors must be [B, P, 2], got sum_logp of shape {tuple(shape)}")
    for f, t in zip(SequenceStats._fields, stats):
        if t.shape != shape:
            raise ValueError(f"amopo_loss: stats.{f} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return stats


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    near_zero = x > -math.log(2.0)
    # Each branch gets an argument that is safe for it, so the unused branch of
    # torch.where cannot produce inf/NaN gradients.
    x_near = torch.where(near_zero, x, torch.full_like(x, -1.0))
    x_far = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def pair_losses(a_BP2: torch.Tensor, cfg: AmopoConfig) -> torch.Tensor:
    """Per-pair loss L_BP from length-normalised log-probs a = sum_logp / n.

    SimPO (Meng et al. 2024, Eq. 6): -log sigmoid(beta (a_c - a_r) - gamma).
    ORPO (Hong et al. 2024, Eq. 6-7 with length-normalised log-probs):
    -a_c + beta * -log sigmoid(log odds(a_c) - log odds(a_r)), odds(a) = e^a / (1 - e^a).
    """
    a_c, a_r = a_BP2[..., 0], a_BP2[..., 1]
    if cfg.loss_type == "simpo":
        return -torch.nn.functional.logsigmoid(cfg.beta * (a_c - a_r) - cfg.gamma)
    if cfg.loss_type == "orpo":
        ac = a_c.clamp(max=ORPO_MAX_LOGP)
        ar = a_r.clamp(max=ORPO_MAX_LOGP)
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        return -a_c - cfg.beta * torch.nn.functional.logsigmoid(log_odds)
    raise ValueError(f"amopo_loss: unknown cfg.loss_type {cfg.loss_type!r}; expected 'simpo' or 'orpo'")


def masked_softmax(scores_BP: torch.Tensor, valid_BP: torch.Tensor) -> torch.Tensor:
    """Softmax over each sample's valid pairs; invalid pairs and all-invalid rows get 0."""
    neg_inf = torch.full_like(scores_BP, float("-inf"))
    masked_BP = torch.where(valid_BP, scores_BP, neg_inf)
    any_B1 = valid_BP.any(dim=-1, keepdim=True)
    masked_BP = torch.where(any_B1, masked_BP, torch.zeros_like(masked_BP))  # avoid softmax of all -inf
    return torch.softmax(masked_BP, dim=-1) * valid_BP


def gaussian_moments(stats: SequenceStats, valid_BP2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean mu and unbiased std sigma of the token probabilities of each sequence, [B, P, 2].

    sigma^2 = (sum p^2 - n mu^2) / (n - 1), clamped at 0 against rounding; sigma = 0 for n < 2.
    """
    n_BP2 = stats.n.to(stats.sum_p.dtype)
    n_safe_BP2 = torch.where(valid_BP2, n_BP2, torch.ones_like(n_BP2))
    mu_BP2 = torch.where(valid_BP2, stats.sum_p / n_safe_BP2, torch.zeros_like(n_BP2))
    many_BP2 = n_BP2 >= 2
    dof_BP2 = torch.where(many_BP2, n_BP2 - 1, torch.ones_like(n_BP2))
    var_BP2 = torch.clamp(stats.sum_p2 - n_BP2 * mu_BP2 * mu_BP2, min=0.0) / dof_BP2
    sigma_BP2 = torch.where(many_BP2, torch.sqrt(var_BP2), torch.zeros_like(var_BP2))
    return mu_BP2, sigma_BP2


def _fixed_weights(cfg: AmopoConfig, valid_BP: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cfg.fixed_weights restricted to the valid pairs and renormalised per sample."""
    num_pairs = valid_BP.shape[1]
    if cfg.fixed_weights is None or len(cfg.fixed_weights) != num_pairs:
        got = None if cfg.fixed_weights is None else len(cfg.fixed_weights)
        raise ValueError(
            f"amopo_loss: weighting 'fixed' needs cfg.fixed_weights with one value per pair "
            f"(P = {num_pairs}, in the order of the dataset's pair names), got {got} values"
        )
    fixed_P = torch.tensor(cfg.fixed_weights, dtype=dtype, device=valid_BP.device)
    raw_BP = fixed_P * valid_BP
    total_B1 = raw_BP.sum(dim=-1, keepdim=True)
    # A sample whose valid pairs all have weight 0 keeps weights 0 (safe denominator).
    return raw_BP / torch.where(total_B1 > 0, total_B1, torch.ones_like(total_B1))


@torch.no_grad()
def pair_weights(
    stats: SequenceStats,
    valid_BP: torch.Tensor,
    cfg: AmopoConfig,
    normals: Optional[torch.Tensor],
    sample_ids: Optional[torch.Tensor],
    epoch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_BP used in the loss, deterministic mean-mode weights), both constants (no grad).

    Gaussian weights (paper Sec. 3): g ~ N(mu, sigma^2) per response, r_k = g_c + g_r,
    w = softmax_k(r) ("gaussian", published code) or softmax_k(-r) ("gaussian-inverse").
    """
    stats = SequenceStats(*(t.detach() for t in stats))
    valid_BP2 = valid_BP.unsqueeze(-1).expand(stats.n.shape)
    mu_BP2, sigma_BP2 = gaussian_moments(stats, valid_BP2)
    mean_mode_BP = masked_softmax(mu_BP2.sum(dim=-1), valid_BP)
    mode = cfg.weighting
    if mode in _GAUSSIAN_MODES:
        z_BP2 = _normals(stats, cfg, normals, sample_ids, epoch)
        r_BP = (mu_BP2 + sigma_BP2 * z_BP2).sum(dim=-1)
        return masked_softmax(r_BP if mode == "gaussian" else -r_BP, valid_BP), mean_mode_BP
    if mode == "mean":
        return mean_mode_BP, mean_mode_BP
    if mode == "equal":
        count_B1 = valid_BP.sum(dim=-1, keepdim=True).clamp(min=1).to(mu_BP2.dtype)
        return valid_BP.to(mu_BP2.dtype) / count_B1, mean_mode_BP
    if mode == "fixed":
        return _fixed_weights(cfg, valid_BP, mu_BP2.dtype), mean_mode_BP
    raise ValueError(f"amopo_loss: unknown cfg.weighting {mode!r}")


def _normals(
    stats: SequenceStats,
    cfg: AmopoConfig,
    normals: Optional[torch.Tensor],
    sample_ids: Optional[torch.Tensor],
    epoch: int,
) -> torch.Tensor:
    """The z of the Gaussian draws: given, or counter-based from the global sample ids."""
    shape = stats.sum_p.shape
    if normals is not None:
        if normals.shape != shape:
            raise ValueError(f"amopo_loss: normals must have shape {tuple(shape)}, got {tuple(normals.shape)}")
        return normals.detach().to(stats.sum_p.dtype)
    if sample_ids is None:
        raise ValueError(
            f"amopo_loss: weighting {cfg.weighting!r} draws Gaussian samples keyed by global sample id; "
            "pass sample_ids (int64 [B]) or explicit normals [B, P, 2]"
        )
    if sample_ids.shape != shape[:1]:
        raise ValueError(f"amopo_loss: sample_ids must have shape [{shape[0]}], got {tuple(sample_ids.shape)}")
    z_BP2 = counter_normals(cfg.seed, epoch, sample_ids, shape[1], device=stats.sum_p.device)
    return z_BP2.to(stats.sum_p.dtype)


def amopo_loss(
    stats: SequenceStats,
    cfg: AmopoConfig,
    normals: Optional[torch.Tensor] = None,
    sample_ids: Optional[torch.Tensor] = None,
    epoch: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Per-sample AMoPO loss [B] and a metrics dict.

    loss_b = sum_k w_bk L_bk + sft_weight * mean_{valid k} (-a_c,bk), 0 for a sample with no
    valid pair; with ``cfg.pair_reduction == "mean"`` the first term is divided by the number of
    valid pairs. A pair is valid when both of its responses have n > 0 tokens.
    ``normals`` z_BP2 overrides the counter-based draws (then ``sample_ids`` is not needed).
    """
    stats = _checked_stats(stats)
    dtype = stats.sum_logp.dtype
    n_BP2 = stats.n.to(dtype)
    valid_BP = (n_BP2 > 0).all(dim=-1)
    valid_BP2 = valid_BP.unsqueeze(-1).expand_as(n_BP2)
    # Safe values where invalid so that no inf/NaN reaches the graph, even times 0.
    n_safe_BP2 = torch.where(valid_BP2, n_BP2, torch.ones_like(n_BP2))
    a_BP2 = torch.where(valid_BP2, stats.sum_logp / n_safe_BP2, torch.full_like(n_BP2, -1.0))
    zero_BP = torch.zeros_like(a_BP2[..., 0])
    loss_BP = torch.where(valid_BP, pair_losses(a_BP2, cfg), zero_BP)
    w_BP, w_mean_mode_BP = pair_weights(stats, valid_BP, cfg, normals, sample_ids, epoch)
    w_BP, w_mean_mode_BP = w_BP.to(dtype), w_mean_mode_BP.to(dtype)

    sample_valid_B = valid_BP.any(dim=-1)
    num_valid_B = valid_BP.sum(dim=-1).clamp(min=1).to(dtype)
    nll_B = torch.where(valid_BP, -a_BP2[..., 0], zero_BP).sum(dim=-1) / num_valid_B
    pairs_B = (w_BP * loss_BP).sum(dim=-1)
    if cfg.pair_reduction == "mean":
        # The published code's scale: it averages the P weighted pair losses (at batch 1).
        pairs_B = pairs_B / num_valid_B
    elif cfg.pair_reduction != "sum":
        raise ValueError(f"amopo_loss: unknown cfg.pair_reduction {cfg.pair_reduction!r}; expected 'sum' or 'mean'")
    loss_B = pairs_B + cfg.sft_weight * nll_B
    loss_B = torch.where(sample_valid_B, loss_B, torch.zeros_like(loss_B))

    pair_sums_EP, pair_counts_P = _pair_sums(a_BP2, loss_BP, w_BP, w_mean_mode_BP, valid_BP, cfg)
    metrics = {
        "weights": w_BP,
        "weights_mean_mode": w_mean_mode_BP,
        "pair_losses": loss_BP.detach(),
        "pair_margins": (cfg.beta * (a_BP2[..., 0] - a_BP2[..., 1])).detach(),
        "pair_valid": valid_BP,
        "sample_valid": sample_valid_B,
        "pair_sums": pair_sums_EP,
        "pair_counts": pair_counts_P,
    }
    return loss_B, metrics


@torch.no_grad()
def _pair_sums(
    a_BP2: torch.Tensor,
    loss_BP: torch.Tensor,
    w_BP: torch.Tensor,
    w_mean_mode_BP: torch.Tensor,
    valid_BP: torch.Tensor,
    cfg: AmopoConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over valid samples of each ``PAIR_METRIC_NAMES`` row, [E, P], and counts [P].

    Both are plain sums (the counts in the same float dtype), so data-parallel ranks
    combine them with one SUM all-reduce before ``summarize_metrics``.
    """
    a_c_BP, a_r_BP = a_BP2.detach()[..., 0], a_BP2.detach()[..., 1]
    rows = {
        "loss": loss_BP.detach(),
        "weight": w_BP,
        "weight_sq": w_BP * w_BP,
        "margin": cfg.beta * (a_c_BP - a_r_BP),
        "accuracy": (a_c_BP > a_r_BP).to(a_c_BP.dtype),
        "logp_chosen": a_c_BP,
        "logp_rejected": a_r_BP,
        "weight_mean_mode": w_mean_mode_BP,
        "weight_mean_mode_sq": w_mean_mode_BP * w_mean_mode_BP,
    }
    zero_BP = torch.zeros_like(a_c_BP)
    pair_sums_EP = torch.stack([torch.where(valid_BP, rows[name], zero_BP).sum(dim=0) for name in PAIR_METRIC_NAMES])
    return pair_sums_EP, valid_BP.to(a_c_BP.dtype).sum(dim=0)


def reduce_for_schedule(loss_per_sample: torch.Tensor, metrics: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-sample losses, number of valid samples) for Megatron's schedule.

    Megatron's ``loss_func`` may return ``(loss, num_tokens, report)``; with
    ``calculate_per_token_loss`` the schedule sums ``num_tokens`` over micro-batches and
    data-parallel ranks and divides the gradients by it, so the global loss is the mean
    over valid samples whatever the batch split. The count is int32 like the schedule's
    ``total_num_tokens`` accumulator.
    """
    count = metrics["sample_valid"].sum().to(torch.int)
    return loss_per_sample.sum(), count


def summarize_metrics(
    pair_sums: torch.Tensor, pair_counts: torch.Tensor, pair_names: Sequence[str]
) -> dict[str, float]:
    """Flat ``{"metric/pair": float}`` means from (all-reduced) ``pair_sums`` and ``pair_counts``.

    ``weight_std`` and ``weight_mean_mode_std`` are population standard deviations over
    the batch, from sums of squares. Pairs with no valid sample are left out; "<metric>/all"
    pools every valid (sample, pair) of the general and dimension pairs, "<metric>/mirrored" those of the
    mirrored pairs (``objective/pairs.py``).
    """
    sums_EP = pair_sums.detach().to(device="cpu", dtype=torch.float64)
    counts_P = pair_counts.detach().to(device="cpu", dtype=torch.float64)
    expected = (len(PAIR_METRIC_NAMES), len(pair_names))
    if tuple(sums_EP.shape) != expected or tuple(counts_P.shape) != expected[1:]:
        raise ValueError(
            f"summarize_metrics: expected pair_sums {expected} and pair_counts ({expected[1]},) for pair_names "
            f"{list(pair_names)}, got {tuple(sums_EP.shape)} and {tuple(counts_P.shape)}"
        )
    out: dict[str, float] = {}
    for k, name in enumerate(pair_names):
        count = float(counts_P[k])
        if count <= 0:
            continue
        mean = {row: float(sums_EP[_ROW[row], k]) / count for row in PAIR_METRIC_NAMES}
        for row in ("loss", "weight", "weight_mean_mode", "margin", "accuracy", "logp_chosen", "logp_rejected"):
            out[f"{row}/{name}"] = mean[row]
        for row in ("weight", "weight_mean_mode"):
            out[f"{row}_std/{name}"] = math.sqrt(max(mean[f"{row}_sq"] - mean[row] ** 2, 0.0))
    mirrored_P = torch.tensor([is_mirrored(name) for name in pair_names], dtype=torch.bool)
    for pool, keep_P in (("all", ~mirrored_P), ("mirrored", mirrored_P)):
        total = float(counts_P[keep_P].sum())
        if total > 0:
            for row in ("loss", "margin", "accuracy", "logp_chosen", "logp_rejected"):
                out[f"{row}/{pool}"] = float(sums_EP[_ROW[row]][keep_P].sum()) / total
    return out
