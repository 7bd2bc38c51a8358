"""The experiment's single-objective baseline: --amopo-weighting fixed 1 0 ... 0 is SimPO on the general pair."""

from __future__ import annotations

import torch

from megatron_amopo.config import AmopoConfig
from megatron_amopo.objective.amopo import SequenceStats, amopo_loss


def test_fixed_one_zero_weights_are_simpo_on_the_general_pair():
    gen = torch.Generator().manual_seed(0)
    a_BP2 = (-torch.rand(5, 3, 2, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    n_BP2 = torch.randint(2, 9, (5, 3, 2), generator=gen).double()
    p_BP2 = torch.exp(a_BP2.detach())
    stats = SequenceStats(a_BP2 * n_BP2, n_BP2, p_BP2 * n_BP2, p_BP2 * p_BP2 * n_BP2)
    cfg = AmopoConfig(weighting="fixed", fixed_weights=[1.0, 0.0, 0.0])
    loss_B, metrics = amopo_loss(stats, cfg)
    # SimPO (Meng et al. 2024, Eq. 6) on pair 0 with the length-normalised log-probs a = sum_logp / n.
    want_B = -torch.nn.functional.logsigmoid(cfg.beta * (a_BP2[:, 0, 0] - a_BP2[:, 0, 1]) - cfg.gamma)
    torch.testing.assert_close(loss_B, want_B)
    loss_B.sum().backward()
    assert a_BP2.grad[:, 1:].abs().max() == 0 and a_BP2.grad[:, 0].abs().min() > 0
    torch.testing.assert_close(metrics["weights"], torch.tensor([[1.0, 0.0, 0.0]] * 5, dtype=torch.float64))
