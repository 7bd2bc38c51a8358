"""AMoPO objective against a naive per-sample loop written from the formulas (docs/OBJECTIVE.md)."""

import decimal
import math
import random

import pytest
import torch

from megatron_amopo.config import AmopoConfig
from megatron_amopo.objective import amopo
from megatron_amopo.objective.amopo import (
    PAIR_METRIC_NAMES,
    SequenceStats,
    amopo_loss,
    reduce_for_schedule,
    summarize_metrics,
)
from megatron_amopo.objective.rng import counter_normals

WEIGHTINGS = ("gaussian", "gaussian-inverse", "mean", "equal", "fixed")


# ---------------------------------------------------------------------------
# Inputs: statistics of real token-probability lists, so sum_p2 and n agree.


def make_tokens(rnd: random.Random, B: int, P: int, p_one: float = 0.0):
    """probs[b][k][s]: a list of token probabilities; lengths include 0 and 1."""
    probs = []
    for _ in range(B):
        sample = []
        for _ in range(P):
            pair = []
            for _ in range(2):
                n = rnd.choice([0, 1, 1, 2, 3, 5, 8, 13, 21]) if rnd.random() < 0.35 else rnd.randint(2, 30)
                pair.append([1.0 if rnd.random() < p_one else rnd.uniform(0.02, 0.999) for _ in range(n)])
            sample.append(pair)
        probs.append(sample)
    return probs


def stats_from_tokens(probs, dtype=torch.float64) -> SequenceStats:
    def t(fn):
        return torch.tensor([[[fn(seq) for seq in pair] for pair in sample] for sample in probs], dtype=dtype)

    return SequenceStats(
        sum_logp=t(lambda q: sum(math.log(x) for x in q)),
        n=t(len),
        sum_p=t(sum),
        sum_p2=t(lambda q: sum(x * x for x in q)),
    )


# ---------------------------------------------------------------------------
# The naive reference: python floats and the math module, one sample and pair at a time.


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def naive_pair_loss(ac: float, ar: float, cfg) -> float:
    if cfg.loss_type == "simpo":
        return softplus(-(cfg.beta * (ac - ar) - cfg.gamma))
    cc, cr = min(ac, amopo.ORPO_MAX_LOGP), min(ar, amopo.ORPO_MAX_LOGP)
    log_odds = (cc - cr) - (math.log(-math.expm1(cc)) - math.log(-math.expm1(cr)))
    return -ac + cfg.beta * softplus(-log_odds)


def naive_softmax(scores: list, valid: list) -> list:
    top = max(s for s, v in zip(scores, valid) if v)
    e = [math.exp(s - top) if v else 0.0 for s, v in zip(scores, valid)]
    return [x / sum(e) for x in e]


def naive_draw(stats, b, k, s, z) -> tuple[float, float]:
    """(mu, mu + sigma z) for one sequence."""
    n = stats.n[b, k, s].item()
    mu = stats.sum_p[b, k, s].item() / n
    var = max(stats.sum_p2[b, k, s].item() - n * mu * mu, 0.0) / (n - 1) if n >= 2 else 0.0
    return mu, mu + math.sqrt(var) * z[b][k][s]


def naive_weights(stats, b, valid, cfg, z) -> list:
    P = len(valid)
    if cfg.weighting == "equal":
        return [1.0 / sum(valid) if v else 0.0 for v in valid]
    if cfg.weighting == "fixed":
        total = sum(w for w, v in zip(cfg.fixed_weights, valid) if v)
        return [w / total if v and total > 0 else 0.0 for w, v in zip(cfg.fixed_weights, valid)]
    draws = [[naive_draw(stats, b, k, s, z) if valid[k] else (0.0, 0.0) for s in range(2)] for k in range(P)]
    if cfg.weighting == "mean":
        scores = [draws[k][0][0] + draws[k][1][0] for k in range(P)]
    else:
        r = [draws[k][0][1] + draws[k][1][1] for k in range(P)]
        scores = r if cfg.weighting == "gaussian" else [-x for x in r]
    return naive_softmax(scores, valid)


def naive_amopo(stats, cfg, z):
    """Per-sample losses and weights [B][P]."""
    B, P = stats.n.shape[:2]
    losses, weights = [], []
    for b in range(B):
        n = [[stats.n[b, k, s].item() for s in range(2)] for k in range(P)]
        valid = [n[k][0] > 0 and n[k][1] > 0 for k in range(P)]
        if not any(valid):
            losses.append(0.0)
            weights.append([0.0] * P)
            continue
        a = [[stats.sum_logp[b, k, s].item() / n[k][s] if valid[k] else 0.0 for s in range(2)] for k in range(P)]
        w = naive_weights(stats, b, valid, cfg, z)
        loss = sum(w[k] * naive_pair_loss(a[k][0], a[k][1], cfg) for k in range(P) if valid[k])
        loss += cfg.sft_weight * sum(-a[k][0] for k in range(P) if valid[k]) / sum(valid)
        losses.append(loss)
        weights.append(w)
    return losses, weights


def make_cfg(loss_type, weighting, P, rnd, sft_weight=0.0):
    fixed = [rnd.choice([0.0, 0.5, 1.0, 2.0, 3.0]) for _ in range(P)] if weighting == "fixed" else None
    if fixed is not None and sum(fixed) == 0:
        fixed[0] = 1.0
    return AmopoConfig(
        loss_type=loss_type,
        weighting=weighting,
        fixed_weights=fixed,
        beta=rnd.uniform(0.5, 3.0),
        gamma=rnd.uniform(0.0, 2.0),
        sft_weight=sft_weight,
        seed=rnd.randint(0, 2**31),
    )


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("P", [1, 2, 4])
def test_matches_naive_loop(loss_type, weighting, P):
    rnd = random.Random(f"{loss_type}-{weighting}-{P}")
    for trial in range(4):
        B = rnd.randint(1, 6)
        stats = stats_from_tokens(make_tokens(rnd, B, P))
        cfg = make_cfg(loss_type, weighting, P, rnd, sft_weight=[0.0, 0.3][trial % 2])
        sample_ids = torch.tensor([rnd.randint(0, 10**9) for _ in range(B)], dtype=torch.int64)
        given = torch.randn(B, P, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(trial))
        for normals in (given, None):  # explicit z, and counter-based z keyed by sample id
            z = given if normals is not None else counter_normals(cfg.seed, 2, sample_ids, P).double()
            loss, metrics = amopo_loss(stats, cfg, normals=normals, sample_ids=sample_ids, epoch=2)
            want_loss, want_w = naive_amopo(stats, cfg, z.tolist())
            torch.testing.assert_close(loss, torch.tensor(want_loss, dtype=torch.float64), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(
                metrics["weights"], torch.tensor(want_w, dtype=torch.float64), rtol=1e-12, atol=1e-12
            )
            valid = (stats.n > 0).all(-1).any(-1)
            assert torch.equal(metrics["sample_valid"], valid)


def test_stats_type_shape_and_int_lengths():
    rnd = random.Random(0)
    stats = stats_from_tokens(make_tokens(rnd, 4, 3))
    cfg = AmopoConfig(weighting="mean", sft_weight=0.1)
    int_n = stats._replace(n=stats.n.long())
    torch.testing.assert_close(amopo_loss(int_n, cfg)[0], amopo_loss(stats, cfg)[0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="SequenceStats"):
        amopo_loss(stats._asdict(), cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, P, 2\]"):
        amopo_loss(SequenceStats(*(v[..., :1] for v in stats)), cfg)
    with pytest.raises(ValueError, match="stats.sum_p2"):
        amopo_loss(stats._replace(sum_p2=stats.sum_p2[:1]), cfg)


def test_log1mexp_accuracy():
    xs = [-1e-12, -1e-6, -0.3, -math.log(2.0), -0.7, -5.0, -40.0]
    got = amopo.log1mexp(torch.tensor(xs, dtype=torch.float64))
    with decimal.localcontext() as ctx:  # 50-digit reference, independent of float rounding
        ctx.prec = 50
        want_dec = [(1 - decimal.Decimal(x).exp()).ln() for x in xs]
    want = torch.tensor([float(v) for v in want_dec], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_gradcheck_wrt_sum_logp(loss_type):
    rnd = random.Random(loss_type)
    probs = make_tokens(rnd, 3, 3)
    probs[0][1][0] = []  # an invalid pair: constant in sum_logp, zero gradient
    stats = stats_from_tokens(probs)
    cfg = AmopoConfig(loss_type=loss_type, weighting="gaussian", sft_weight=0.2, beta=1.5)
    z = torch.randn(3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(sum_logp):
        return amopo_loss(stats._replace(sum_logp=sum_logp), cfg, normals=z)[0]

    x = stats.sum_logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_weights_carry_no_gradient():
    rnd = random.Random(5)
    stats = stats_from_tokens(make_tokens(rnd, 4, 3))
    leaves = {k: getattr(stats, k).clone().requires_grad_(True) for k in ("sum_logp", "sum_p", "sum_p2")}
    for weighting in ("gaussian", "gaussian-inverse", "mean"):
        loss, metrics = amopo_loss(
            stats._replace(**leaves), AmopoConfig(weighting=weighting), sample_ids=torch.arange(4)
        )
        assert not metrics["weights"].requires_grad
        loss.sum().backward()
        assert leaves["sum_logp"].grad is not None and leaves["sum_logp"].grad.abs().sum() > 0
        for k in ("sum_p", "sum_p2"):
            assert leaves[k].grad is None or not leaves[k].grad.any()


def test_identical_sides_give_simpo_floor():
    rnd = random.Random(9)
    probs = make_tokens(rnd, 3, 4)
    for sample in probs:
        for pair in sample:
            pair[0] = pair[1] = [rnd.uniform(0.1, 0.9) for _ in range(rnd.randint(1, 9))]
    stats = stats_from_tokens(probs)
    for weighting in ("gaussian", "equal", "mean"):
        cfg = AmopoConfig(weighting=weighting, gamma=2.0, beta=0.8)
        loss, _ = amopo_loss(stats, cfg, sample_ids=torch.arange(3))
        assert loss.tolist() == pytest.approx([math.log1p(math.exp(2.0))] * 3, rel=1e-12)
        assert float(loss[0]) == pytest.approx(2.1269, abs=1e-4)


def test_invalid_pairs_and_samples():
    rnd = random.Random(3)
    probs = make_tokens(rnd, 3, 4)
    for sample in probs:
        for pair in sample:
            for s in range(2):
                pair[s] = pair[s] or [0.4, 0.6]
    probs[0][1][0] = []  # sample 0: pair 1 invalid (no chosen tokens)
    probs[1][0][1] = []  # sample 1: every pair invalid
    for k in range(1, 4):
        probs[1][k][k % 2] = []
    stats = stats_from_tokens(probs)
    # Garbage where n = 0 must not leak anywhere.
    stats = stats._replace(
        **{
            key: torch.where(stats.n > 0, getattr(stats, key), torch.full_like(stats.n, float("nan")))
            for key in ("sum_logp", "sum_p", "sum_p2")
        }
    )
    z = torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for loss_type in ("simpo", "orpo"):
        x = stats.sum_logp.clone().requires_grad_(True)
        cfg = AmopoConfig(loss_type=loss_type, weighting="gaussian", sft_weight=0.5)
        loss, metrics = amopo_loss(stats._replace(sum_logp=x), cfg, normals=z)
        assert metrics["sample_valid"].tolist() == [True, False, True]
        assert float(loss[1].detach()) == 0.0 and torch.isfinite(loss).all()
        w = metrics["weights"]
        assert w[1].tolist() == [0.0] * 4 and float(w[0, 1]) == 0.0
        # Sample 0's softmax runs over its valid pairs 0, 2, 3 only.
        mu = stats.sum_p[0] / stats.n[0]
        var = (stats.sum_p2[0] - stats.n[0] * mu**2) / (stats.n[0] - 1)
        r = (mu + var.clamp(min=0).sqrt().nan_to_num() * z[0]).sum(-1)
        keep = torch.tensor([0, 2, 3])
        torch.testing.assert_close(w[0, keep], torch.softmax(r[keep], 0), rtol=1e-12, atol=1e-12)
        loss.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert not x.grad[1].any() and not x.grad[0, 1].any()
        assert metrics["pair_counts"].tolist() == [2.0, 1.0, 2.0, 2.0]
    assert reduce_for_schedule(loss, metrics)[1].item() == 2


def test_orpo_at_logp_zero_is_finite():
    stats = stats_from_tokens([[[[1.0, 1.0, 1.0], [0.5, 0.9]], [[0.3], [1.0]]]])
    x = stats.sum_logp.clone().requires_grad_(True)
    loss, _ = amopo_loss(stats._replace(sum_logp=x), AmopoConfig(loss_type="orpo", weighting="equal"))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


def test_gaussian_and_inverse_weights():
    rnd = random.Random(11)
    probs = [
        [[[rnd.uniform(0.05, 0.95) for _ in range(rnd.randint(2, 12))] for _ in range(2)] for _ in range(4)]
        for _ in range(5)
    ]
    stats = stats_from_tokens(probs)
    z = torch.randn(5, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    # r_k = sum over sides of mean + unbiased std * z, from the token lists themselves.
    def draw(b, k, s):
        tokens = torch.tensor(probs[b][k][s], dtype=torch.float64)
        return tokens.mean() + tokens.std() * z[b, k, s]

    r = torch.tensor([[draw(b, k, 0) + draw(b, k, 1) for k in range(4)] for b in range(5)], dtype=torch.float64)
    w_g = amopo_loss(stats, AmopoConfig(weighting="gaussian"), normals=z)[1]["weights"]
    w_i = amopo_loss(stats, AmopoConfig(weighting="gaussian-inverse"), normals=z)[1]["weights"]
    torch.testing.assert_close(w_g, torch.softmax(r, -1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w_i, torch.softmax(-r, -1), rtol=1e-10, atol=1e-12)
    assert (w_g - w_i).abs().max() > 1e-3


def test_bad_inputs_raise():
    stats = stats_from_tokens(make_tokens(random.Random(1), 2, 4))
    for weighting in ("gaussian", "gaussian-inverse"):
        with pytest.raises(ValueError, match="sample_ids"):
            amopo_loss(stats, AmopoConfig(weighting=weighting))
    amopo_loss(stats, AmopoConfig(weighting="mean"))  # no draws, no ids needed
    with pytest.raises(ValueError, match="normals must have shape"):
        amopo_loss(stats, AmopoConfig(), normals=torch.zeros(2, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="fixed_weights"):
        amopo_loss(stats, AmopoConfig(weighting="fixed", fixed_weights=[1.0, 1.0, 1.0]))


def test_split_batches_reduce_to_the_same_global_mean():
    rnd = random.Random(21)
    probs = make_tokens(rnd, 7, 3)
    probs[4] = [[[], [0.5]] for _ in range(3)]  # an invalid sample
    stats = stats_from_tokens(probs)
    ids = torch.arange(100, 107)
    cfg = AmopoConfig(loss_type="orpo", weighting="gaussian-inverse", sft_weight=0.2)
    loss, metrics = amopo_loss(stats, cfg, sample_ids=ids, epoch=1)
    total, count = reduce_for_schedule(loss, metrics)
    assert count.dtype == torch.int32 and count.dim() == 0 and total.dim() == 0
    assert int(count) == int(metrics["sample_valid"].sum()) and 0 < int(count) < 7
    parts_total, parts_count, parts_sums, parts_counts = 0.0, 0, 0.0, 0.0
    for lo, hi in ((0, 2), (2, 3), (3, 7)):
        part = SequenceStats(*(v[lo:hi] for v in stats))
        part_loss, part_metrics = amopo_loss(part, cfg, sample_ids=ids[lo:hi], epoch=1)
        t, c = reduce_for_schedule(part_loss, part_metrics)
        parts_total, parts_count = parts_total + t, parts_count + c
        parts_sums = parts_sums + part_metrics["pair_sums"]
        parts_counts = parts_counts + part_metrics["pair_counts"]
    assert int(parts_count) == int(count)
    torch.testing.assert_close(parts_total / parts_count, total / count, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts_sums, metrics["pair_sums"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts_counts, metrics["pair_counts"], rtol=0, atol=0)


def test_summarize_metrics_by_hand():
    # a = sum_logp / n with n = 2; sum_p chosen so that mu_c + mu_r is 1.0 (s0 pair 0), 0.5 (s0 pair 1).
    def seq(a, mu):
        return {"sum_logp": 2 * a, "n": 2, "sum_p": 2 * mu, "sum_p2": 2 * mu * mu}

    empty = {"sum_logp": 0.0, "n": 0, "sum_p": 0.0, "sum_p2": 0.0}
    layout = [
        [[seq(-0.5, 0.5), seq(-1.0, 0.5)], [seq(-1.0, 0.25), seq(-0.5, 0.25)]],
        [[seq(-0.2, 0.3), seq(-0.4, 0.3)], [seq(-0.3, 0.3), empty]],
        [[empty, seq(-0.1, 0.1)], [empty, empty]],
    ]
    stats = SequenceStats(
        *(
            torch.tensor([[[s[k] for s in pair] for pair in sample] for sample in layout], dtype=torch.float64)
            for k in SequenceStats._fields
        )
    )
    beta, gamma = 2.0, 1.0
    _, metrics = amopo_loss(stats, AmopoConfig(weighting="equal", beta=beta, gamma=gamma))
    assert metrics["pair_sums"].shape == (len(PAIR_METRIC_NAMES), 2)
    out = summarize_metrics(metrics["pair_sums"], metrics["pair_counts"], ["general", "helpfulness"])

    def simpo(ac, ar):
        return math.log1p(math.exp(-(beta * (ac - ar) - gamma)))

    sig = 1.0 / (1.0 + math.exp(-0.5))  # softmax([1.0, 0.5])[0]
    want = {
        "loss/general": (simpo(-0.5, -1.0) + simpo(-0.2, -0.4)) / 2,
        "loss/helpfulness": simpo(-1.0, -0.5),
        "weight/general": 0.75,
        "weight_std/general": 0.25,
        "weight/helpfulness": 0.5,
        "weight_std/helpfulness": 0.0,
        "weight_mean_mode/general": (sig + 1.0) / 2,
        "weight_mean_mode_std/general": (1.0 - sig) / 2,
        "weight_mean_mode/helpfulness": 1.0 - sig,
        "weight_mean_mode_std/helpfulness": 0.0,
        "margin/general": beta * (0.5 + 0.2) / 2,
        "margin/helpfulness": beta * -0.5,
        "accuracy/general": 1.0,
        "accuracy/helpfulness": 0.0,
        "logp_chosen/general": -0.35,
        "logp_rejected/general": -0.7,
        "logp_chosen/helpfulness": -1.0,
        "logp_rejected/helpfulness": -0.5,
        "loss/all": (simpo(-0.5, -1.0) + simpo(-0.2, -0.4) + simpo(-1.0, -0.5)) / 3,
        "margin/all": beta * (0.5 + 0.2 - 0.5) / 3,
        "accuracy/all": 2 / 3,
        "logp_chosen/all": -1.7 / 3,
        "logp_rejected/all": -1.9 / 3,
    }
    assert set(out) == set(want)
    for key, value in want.items():
        assert out[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    with pytest.raises(ValueError, match="pair_names"):
        summarize_metrics(metrics["pair_sums"], metrics["pair_counts"], ["general"])
