"""Our SimPO and ORPO pair losses against TRL's (a library we did not write), losses and gradients.

TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` and ``ORPOTrainer.odds_ratio_loss`` are called on
trainer objects built without their ``__init__`` (which needs a model and a dataset): only the attributes
those methods read are set. Inputs are length-normalised log-probs a = sum_logp / n, as both take them.
"""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental since TRL 0.2x
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from megatron_amopo.config import AmopoConfig  # noqa: E402
from megatron_amopo.objective.amopo import pair_losses  # noqa: E402

CPU = SimpleNamespace(device=torch.device("cpu"))  # the only part of an Accelerator the loss methods read


def trl_simpo(beta: float, gamma: float) -> CPOTrainer:
    trainer = object.__new__(CPOTrainer)
    trainer.loss_type, trainer.beta, trainer.simpo_gamma = "simpo", beta, gamma
    trainer.alpha, trainer.label_smoothing, trainer.accelerator = 0.0, 0.0, CPU
    return trainer


def trl_orpo(beta: float) -> ORPOTrainer:
    trainer = object.__new__(ORPOTrainer)
    trainer.beta, trainer.accelerator = beta, CPU
    return trainer


def length_normalised_logps(seed: int, count: int = 64) -> torch.Tensor:
    """[count, 1, 2] a = sum_logp / n from real token-probability lists (chosen, rejected)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(count, 1, 2, dtype=torch.float64)
    for i in range(count):
        for side in range(2):
            n = int(torch.randint(1, 60, (1,), generator=g))
            p = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
            out[i, 0, side] = p.log().sum() / n
    return out


def _grad(fn, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = a.clone().requires_grad_(True)
    loss = fn(a)
    loss.sum().backward()
    return loss.detach(), a.grad


@pytest.mark.parametrize("beta,gamma", [(0.8, 2.0), (2.5, 0.5), (10.0, 1.4)])
def test_simpo_equals_trl_cpo_simpo(beta, gamma):
    cfg = AmopoConfig(loss_type="simpo", beta=beta, gamma=gamma)
    trainer = trl_simpo(beta, gamma)
    a = length_normalised_logps(seed=int(beta * 10))
    ours, g_ours = _grad(lambda x: pair_losses(x, cfg), a)
    theirs, g_theirs = _grad(lambda x: trainer.cpo_loss(x[..., 0], x[..., 1])[0], a)
    assert theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("beta", [0.1, 0.8, 3.0])
def test_orpo_equals_sft_term_plus_trl_odds_ratio(beta):
    # TRL returns beta * log sigmoid(log odds) (the negative of the loss term) and adds the chosen NLL
    # separately; our pair loss is -a_c - beta * log sigmoid(log odds). TRL's method casts to float32
    # (``.float()``), hence float32 tolerances although the inputs are float64.
    cfg = AmopoConfig(loss_type="orpo", beta=beta)
    trainer = trl_orpo(beta)
    a = length_normalised_logps(seed=int(beta * 100))
    ours, g_ours = _grad(lambda x: pair_losses(x, cfg), a)
    theirs, g_theirs = _grad(lambda x: -x[..., 0] - trainer.odds_ratio_loss(x[..., 0], x[..., 1])[0], a)
    torch.testing.assert_close(ours, theirs.to(torch.float64), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs.to(torch.float64), rtol=2e-5, atol=1e-6)
    # The odds-ratio term alone, which carries beta: a mistake in it cannot hide behind -a_c.
    odds = ours + a[..., 0]
    torch.testing.assert_close(odds, (theirs + a[..., 0]).to(torch.float64), rtol=2e-5, atol=1e-6)
