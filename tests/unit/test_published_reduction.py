"""--amopo-pair-reduction against the published AMoPO trainer's reduction, re-expressed from its formula.

The published code (github.com/Javkonline/AMoPO, ``trainer_multi_obj.py``) stacks the P pair losses of
all B samples of a micro-batch into one vector of P*B, weights them by ONE softmax over the P*B Gaussian
scores r and takes the mean. Our per-sample softmax and reduction are in docs/OBJECTIVE.md; this file
checks the relationship stated there: equal at B = 1 with ``mean``, P times that with ``sum``, and at
B > 1 the published loss is (1/B) sum_b s_b loss_b (s_b: sample b's share of the P*B softmax mass, which
averages 1/B) where ours is (1/B) sum_b loss_b: sample b reweighted by B * s_b, and the whole divided by B.
"""

import pytest
import torch

from megatron_amopo.config import AmopoConfig
from megatron_amopo.objective.amopo import SequenceStats, amopo_loss


def random_stats(B: int, P: int, seed: int) -> SequenceStats:
    """Statistics of real token-probability lists, every pair valid (n >= 2 on both sides)."""
    g = torch.Generator().manual_seed(seed)
    fields = []
    for _ in range(B * P * 2):
        n = int(torch.randint(2, 40, (1,), generator=g))
        p = torch.rand(n, generator=g, dtype=torch.float64) * 0.97 + 0.02
        fields.append((p.log().sum(), float(n), p.sum(), (p * p).sum()))
    cols = [torch.stack([torch.as_tensor(f[i], dtype=torch.float64) for f in fields]).view(B, P, 2) for i in range(4)]
    return SequenceStats(*cols)


def published_loss(stats: SequenceStats, z_BP2: torch.Tensor, cfg: AmopoConfig) -> torch.Tensor:
    """losses.mean() of the published trainer: softmax over all P*B scores, mean of the P*B products."""
    n = stats.n
    a = stats.sum_logp / n
    if cfg.loss_type == "simpo":
        L = -torch.nn.functional.logsigmoid(cfg.beta * (a[..., 0] - a[..., 1]) - cfg.gamma)
    else:
        log_odds = (a[..., 0] - a[..., 1]) - (torch.log1p(-a[..., 0].exp()) - torch.log1p(-a[..., 1].exp()))
        L = -a[..., 0] - cfg.beta * torch.nn.functional.logsigmoid(log_odds)
    mu = stats.sum_p / n
    sigma = ((stats.sum_p2 - n * mu * mu) / (n - 1)).sqrt()
    r = (mu + sigma * z_BP2).sum(-1).detach()  # [B, P]: a draw per response, summed over the pair
    pi = torch.softmax(r.flatten(), dim=0)  # one softmax over the P*B pairs of the micro-batch
    return (pi * L.flatten()).mean(), r


def ours(stats: SequenceStats, z_BP2: torch.Tensor, cfg: AmopoConfig) -> torch.Tensor:
    """The trainer's loss: per-sample losses summed and divided by the number of valid samples."""
    loss_B, metrics = amopo_loss(stats, cfg, normals=z_BP2)
    return loss_B.sum() / metrics["sample_valid"].sum(), loss_B


def _leaf(stats: SequenceStats) -> SequenceStats:
    return stats._replace(sum_logp=stats.sum_logp.clone().requires_grad_(True))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_batch_one_mean_equals_published_and_sum_is_p_times(loss_type):
    P = 4  # general pair + helpfulness, correctness, instruction_following, as in the published set-up
    for seed in range(5):
        stats = random_stats(1, P, seed)
        z = torch.randn(1, P, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
        mean_cfg = AmopoConfig(loss_type=loss_type, pair_reduction="mean")
        sum_cfg = AmopoConfig(loss_type=loss_type, pair_reduction="sum")
        losses, grads = {}, {}
        for name, fn in (
            ("published", lambda s: published_loss(s, z, mean_cfg)[0]),
            ("mean", lambda s: ours(s, z, mean_cfg)[0]),
            ("sum", lambda s: ours(s, z, sum_cfg)[0]),
        ):
            s = _leaf(stats)
            loss = fn(s)
            loss.backward()
            losses[name], grads[name] = loss.detach(), s.sum_logp.grad
        torch.testing.assert_close(losses["mean"], losses["published"], rtol=1e-12, atol=0)
        torch.testing.assert_close(grads["mean"], grads["published"], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(losses["sum"], P * losses["published"], rtol=1e-12, atol=0)
        torch.testing.assert_close(grads["sum"], P * grads["published"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_batch_above_one_reweights_each_sample_by_its_softmax_share(loss_type):
    B, P = 3, 4
    cfg = AmopoConfig(loss_type=loss_type, pair_reduction="mean")
    stats = random_stats(B, P, seed=7)
    z = torch.randn(B, P, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    s_pub = _leaf(stats)
    pub, r_BP = published_loss(s_pub, z, cfg)
    pub.backward()
    share_B = torch.softmax(r_BP.flatten(), 0).view(B, P).sum(-1)  # s_b: sample b's share of the softmax

    s_ours = _leaf(stats)
    plain, loss_B = ours(s_ours, z, cfg)
    reweighted = (B * share_B * loss_B).mean() / B
    reweighted.backward()
    torch.testing.assert_close(reweighted.detach(), pub.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s_ours.sum_logp.grad, s_pub.sum_logp.grad, rtol=1e-12, atol=1e-15)
    # No constant relates them: the shares differ between samples, so the plain mean is another loss.
    assert share_B.max() - share_B.min() > 1e-3
    assert abs(float(plain) - float(pub)) > 1e-6 * abs(float(pub))


def test_mean_divides_by_valid_pairs_only():
    stats = random_stats(2, 4, seed=3)
    n = stats.n.clone()
    n[1, 2, 0] = 0  # sample 1 has 3 valid pairs
    stats = stats._replace(n=n)
    z = torch.zeros(2, 4, 2, dtype=torch.float64)
    loss_sum, m = amopo_loss(stats, AmopoConfig(pair_reduction="sum", sft_weight=0.3), normals=z)
    loss_mean, _ = amopo_loss(stats, AmopoConfig(pair_reduction="mean", sft_weight=0.3), normals=z)
    sft_B = torch.stack(
        [-(stats.sum_logp[b, m["pair_valid"][b], 0] / n[b, m["pair_valid"][b], 0]).mean() for b in (0, 1)]
    )
    torch.testing.assert_close(
        loss_mean - 0.3 * sft_B, (loss_sum - 0.3 * sft_B) / torch.tensor([4.0, 3.0], dtype=torch.float64)
    )


def test_bad_pair_reduction_names_the_flag():
    with pytest.raises(ValueError, match="--amopo-pair-reduction"):
        AmopoConfig(pair_reduction="avg")
