"""Counter-based normals: exact hashing, layout independence and statistical sanity."""

import math

import pytest
import torch

from megatron_amopo.objective import rng

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def py_mix64(z: int) -> int:
    """splitmix64 finaliser in exact unsigned Python integers."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def py_hash(*keys: int) -> int:
    h = 0
    for k in keys:
        h = py_mix64(h ^ py_mix64((k + GOLDEN) & MASK))
    return h


def py_normal(seed, epoch, sample_id, pair, side) -> float:
    key = py_hash(seed, epoch, sample_id, pair, side)
    u1 = ((py_hash(key, 0) >> 12) + 0.5) * 2.0**-52
    u2 = ((py_hash(key, 1) >> 12) + 0.5) * 2.0**-52
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def to_unsigned(t: torch.Tensor) -> list[int]:
    return [int(v) & MASK for v in t.reshape(-1).tolist()]


def test_mix64_matches_splitmix64_reference_vector():
    # First outputs of the reference splitmix64.c generator for seed 1234567
    # (state += golden gamma; output = finaliser(state)).
    expected = [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    states = [rng._as_int64(1234567 + (i + 1) * GOLDEN) for i in range(5)]
    got = to_unsigned(rng.mix64(torch.tensor(states, dtype=torch.int64)))
    assert got == expected
    assert [py_mix64((1234567 + (i + 1) * GOLDEN) & MASK) for i in range(5)] == expected


def test_hash_and_normals_match_exact_integer_reference():
    ids = [0, 1, 7, 123456789, -5, 2**62 + 3]
    seed, epoch, num_pairs = 2**40 + 17, 3, 3
    key = rng.hash_keys(
        seed,
        epoch,
        torch.tensor(ids).view(-1, 1, 1),
        torch.arange(num_pairs).view(1, -1, 1),
        torch.arange(2).view(1, 1, -1),
    )
    want = [py_hash(seed, epoch, i & MASK, p, s) for i in ids for p in range(num_pairs) for s in range(2)]
    assert to_unsigned(key) == want
    z = rng.counter_normals(seed, epoch, torch.tensor(ids), num_pairs, dtype=torch.float64)
    z_ref = torch.tensor(
        [[[py_normal(seed, epoch, i & MASK, p, s) for s in range(2)] for p in range(num_pairs)] for i in ids],
        dtype=torch.float64,
    )
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)


def test_uniforms_stay_in_open_interval_at_extreme_hashes():
    h = torch.tensor([0, -1, 2**63 - 1, -(2**63), 4095, -4096], dtype=torch.int64)
    u = rng.uniform_open01(h)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert float(u.min()) == pytest.approx(2.0**-53, rel=0)


def test_deterministic_and_independent_of_batch_order_split_and_num_pairs():
    ids = torch.tensor([11, 3, 250000, 42, 7, 99], dtype=torch.int64)
    z = rng.counter_normals(5, 1, ids, 4)
    assert z.shape == (6, 4, 2) and z.dtype == torch.float32
    assert torch.equal(z, rng.counter_normals(5, 1, ids.clone(), 4))
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(rng.counter_normals(5, 1, ids[perm], 4), z[perm])
    assert torch.equal(torch.cat([rng.counter_normals(5, 1, ids[:2], 4), rng.counter_normals(5, 1, ids[2:], 4)]), z)
    # Fewer pairs give the leading pairs' draws unchanged.
    assert torch.equal(rng.counter_normals(5, 1, ids, 2), z[:, :2])
    assert torch.equal(rng.counter_normals(5, 1, ids.to(torch.int32), 4), z)


def test_seed_and_epoch_change_the_draws():
    ids = torch.arange(2000)
    base = rng.counter_normals(1, 0, ids, 3)
    for other in (rng.counter_normals(2, 0, ids, 3), rng.counter_normals(1, 1, ids, 3)):
        assert float((other == base).float().mean()) < 1e-3
        assert abs(float(torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1])) < 0.05


def test_statistics_of_200k_draws():
    z = rng.counter_normals(1234, 0, torch.arange(25_000), 4, dtype=torch.float64)  # 200k draws
    flat = z.flatten()
    assert abs(float(flat.mean())) < 0.01
    assert abs(float(flat.std()) - 1.0) < 0.01
    # Kolmogorov-Smirnov statistic against the standard normal CDF; 1.63/sqrt(N) is the 1% critical value.
    xs, _ = torch.sort(flat)
    n = xs.numel()
    cdf = torch.special.ndtr(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert float(ks) < 1.63 / math.sqrt(n)
    assert float(flat.abs().max()) < 8.6  # sqrt(-2 ln 2^-53) bounds |z|

    def corr(x, y):
        return abs(float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]))

    assert corr(z[..., 0], z[..., 1]) < 0.015  # chosen vs rejected side
    assert corr(z[:, :-1], z[:, 1:]) < 0.015  # neighbouring pairs
    assert corr(z[:-1], z[1:]) < 0.015  # neighbouring sample ids


def test_dtype_device_and_bad_input():
    ids = torch.arange(4)
    z64 = rng.counter_normals(0, 0, ids, 2, device="cpu", dtype=torch.float64)
    assert z64.dtype == torch.float64 and z64.device.type == "cpu"
    torch.testing.assert_close(z64.float(), rng.counter_normals(0, 0, ids, 2))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        rng.counter_normals(0, 0, ids.view(2, 2), 2)
    with pytest.raises(ValueError, match="integer tensor"):
        rng.counter_normals(0, 0, ids.float(), 2)
    with pytest.raises(ValueError, match="num_pairs"):
        rng.counter_normals(0, 0, ids, 0)
