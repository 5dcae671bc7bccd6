"""Distributed DP's site release and server decode: the decoded sum is the clipped-gradient sum plus Skellam noise
of exactly the accounted variance, and with no noise it is the plain clipped step (up to rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.errors import PrivacyError
from fedpeft.privacy import distributed, skellam
from fedpeft.training import probe


def _cfg(**privacy):
    return from_mapping({"peft": {"method": "probe"}, "federation": {"secure_aggregation": True, "num_sites": 3,
                                                                    "aggregation": "server-sgd"},
                         "privacy": {"dp": True, "dp_mode": "distributed", **privacy}})


def _features(rows: int = 40, hidden: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(rows, hidden, generator=g), dim=1)
    return probe.Features(torch.cat([x, torch.ones(rows, 1)], 1), torch.randint(0, classes, (rows,), generator=g))


def _plan(dim: int, mu: float, sites: int = 3):
    base = distributed.plan(_cfg(), dim=dim, cohort=sites, max_rows=100)
    return distributed.with_noise(base, mu, num_sites=sites, max_rows=100)


def test_without_noise_the_decoded_sum_is_the_clipped_gradient_sum():
    feats, weight = _features(), torch.randn(3, 9) * 0.1
    plan = _plan(27, mu=1e-9)
    rows = np.arange(len(feats))
    exact = probe.clipped_gradient_sum(weight, feats.x[rows], feats.labels[rows], 1.0).flatten().numpy()
    values = distributed.release(exact, plan_=plan, num_rows=len(feats), rng=np.random.default_rng(0))
    gradient, batch = distributed.decode(skellam.wrap(values, plan.bits), plan)
    # rounding moves each value by less than one unit (plus the noise, which mu = 1e-9 makes 0 here)
    assert np.abs(gradient - exact).max() < 1 / plan.scale
    assert batch == plan.sample_rate * len(feats)


def test_the_sum_of_the_sites_shares_has_the_accounted_variance():
    plan, sites, draws = _plan(4000, mu=400.0), 3, 30
    samples = []
    for draw in range(draws):
        ring = np.zeros(plan.dim + 1, dtype=np.uint64)
        for site in range(sites):
            values = distributed.release(np.zeros(plan.dim), plan_=plan, num_rows=10,
                                         rng=np.random.default_rng([draw, site]))
            ring = (ring + skellam.wrap(values, plan.bits)) % (1 << plan.bits)
        noise, _ = distributed.decode(ring, plan)
        samples.append(noise * plan.scale)
    noise = np.concatenate(samples)
    n = noise.size
    # Skellam(mu): variance mu, kurtosis excess 1/mu; 6-sigma bounds on the sample mean and variance
    assert abs(noise.mean()) < 6 * np.sqrt(plan.mu / n)
    assert abs(noise.var() - plan.mu) < 6 * plan.mu * np.sqrt(2 / n + 1 / (plan.mu * n))


def test_a_release_needs_its_noise_planned_first():
    with pytest.raises(PrivacyError, match="noise variance is not set"):
        distributed.release(np.zeros(4), plan_=distributed.plan(_cfg(), dim=4, cohort=3, max_rows=10), num_rows=1,
                            rng=np.random.default_rng(0))


def test_coupled_rounding_of_neighbouring_sums_stays_within_the_accounted_sensitivity():
    plan, rng = _plan(400, mu=10.0), np.random.default_rng(1)
    g = rng.normal(size=400)
    for _ in range(200):  # neighbours: one row's clipped gradient (norm C) more; the same uniforms round both
        row = rng.normal(size=400)
        row *= plan.clip / np.linalg.norm(row)
        seed = int(rng.integers(1 << 30))
        a = distributed.round_sum(g, plan_=plan, rng=np.random.default_rng(seed))
        b = distributed.round_sum(g + row, plan_=plan, rng=np.random.default_rng(seed))
        assert np.linalg.norm(b - a) <= plan.l2 and np.abs(b - a).sum() <= plan.l1
    assert plan.l2 == pytest.approx(plan.scale * plan.clip + np.sqrt(400)) and plan.l2 < 1.04 * plan.scale
    draws = np.stack([distributed.round_sum(g, plan_=plan, rng=np.random.default_rng(i)) for i in range(400)])
    # unbiased: each value's rounding has variance <= 1/4 (integer units), so its mean over 400 draws is within
    # 6 standard deviations (6 * 0.5 / 20) of the scaled value
    assert np.abs(draws.mean(0) - g * plan.scale).max() < 6 * 0.5 / np.sqrt(400)
