"""The Skellam mechanism's math: noise, conditional rounding, RDP accounting and the secure-aggregation ring.

Statistical checks use fixed seeds and explicit bounds (6 sigma, chi-square p-value) that a wrong variance or a
biased rounding would fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedpeft.errors import PrivacyError
from fedpeft.privacy import skellam as sk

DELTA = 1e-5


# ---- noise -------------------------------------------------------------------------------------------------------


def test_shares_sum_to_the_accounted_skellam():
    """m sites adding Sk(mu/m) each give Sk(mu): mean 0, variance mu, and the Skellam pmf itself."""
    rng = np.random.default_rng(20211011)
    mu, sites, n = 20.0, 8, 200_000
    total = sum(sk.sample(mu / sites, (n,), rng) for _ in range(sites))
    assert total.dtype == np.int64
    # 6-sigma bounds: Var(mean) = mu/n; Var(sample variance) ~ (m4 - mu^2)/n with m4 = mu + 3 mu^2 for Skellam
    assert abs(total.mean()) <= 6 * math.sqrt(mu / n)
    assert abs(total.var(ddof=1) - mu) <= 6 * math.sqrt((mu + 2 * mu * mu) / n)
    # chi-square goodness of fit against Sk(mu/2, mu/2), tails pooled into the edge bins
    edge = 15
    clipped = np.clip(total, -edge, edge)
    observed = np.bincount(clipped + edge, minlength=2 * edge + 1)
    ks = np.arange(-edge, edge + 1)
    probs = stats.skellam.pmf(ks, mu / 2, mu / 2)
    probs[0] = stats.skellam.cdf(-edge, mu / 2, mu / 2)
    probs[-1] = stats.skellam.sf(edge - 1, mu / 2, mu / 2)
    assert abs(probs.sum() - 1) < 1e-12
    _, p_value = stats.chisquare(observed, probs * n)
    assert p_value > 1e-6


def test_sample_edge_cases_and_errors():
    rng = np.random.default_rng(0)
    assert np.array_equal(sk.sample(0.0, (3, 2), rng), np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(PrivacyError, match="mu=-1"):
        sk.sample(-1.0, 4, rng)
    with pytest.raises(PrivacyError, match="Generator"):
        sk.sample(1.0, 4, np.random.RandomState(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("mu", [0.5, 3.0, 50.0, 1e3, 1e5])
@pytest.mark.parametrize("prob", [1e-3, 1e-8, 1e-12])
def test_tail_bound_holds_against_the_exact_skellam_tail(mu, prob):
    t = sk.skellam_tail_bound(mu=mu, prob=prob)
    assert 2 * stats.skellam.sf(t, mu / 2, mu / 2) <= prob  # P(|X| > T) <= prob, exactly
    # and it is not wasteful: at most 25% (+2) above the exact quantile (measured: <= 19%)
    exact = 0
    while 2 * stats.skellam.sf(exact, mu / 2, mu / 2) > prob:
        exact += 1
    assert t <= 1.25 * exact + 2


# ---- rounding ----------------------------------------------------------------------------------------------------


def test_rounded_l2_bound_matches_kairouz_liu_steinke():
    c, d, beta = 2.0 * 5.0, 100, math.exp(-0.5)
    expected = math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + math.sqrt(d) / 2))  # sqrt(2 ln(1/beta)) = 1
    assert sk.rounded_l2_bound(scale=2.0, l2_clip=5.0, dim=d, beta=beta) == pytest.approx(expected)
    assert expected < c + math.sqrt(d)
    assert sk.rounded_l2_bound(scale=2.0, l2_clip=5.0, dim=d, beta=0.0) == pytest.approx(c + math.sqrt(d))
    # tiny c, huge d: the worst-case term c + sqrt(d) can be the smaller one only for beta -> 0
    assert sk.rounded_l2_bound(scale=1.0, l2_clip=1.0, dim=4, beta=1e-300) == pytest.approx(3.0)
    assert sk.rounded_l1_bound(l2_bound=3.0, dim=100) == pytest.approx(9.0)  # L1 <= L2^2 for integers
    assert sk.rounded_l1_bound(l2_bound=30.0, dim=100) == pytest.approx(300.0)  # L1 <= sqrt(d) L2
    with pytest.raises(PrivacyError, match="beta=1.0"):
        sk.rounded_l2_bound(scale=1.0, l2_clip=1.0, dim=4, beta=1.0)


def test_scale_and_round_is_unbiased_and_bounded():
    rng = np.random.default_rng(7)
    d, scale, beta, draws = 16, 10.3, 1e-3, 20_000
    x = rng.normal(size=d)
    x /= np.linalg.norm(x)
    bound = sk.rounded_l2_bound(scale=scale, l2_clip=1.0, dim=d, beta=beta)
    rounded = np.stack([sk.scale_and_round(x, scale=scale, l2_clip=1.0, beta=beta, rng=rng) for _ in range(draws)])
    assert rounded.dtype == np.int64
    assert np.all(np.abs(rounded - scale * x) < 1)  # floor or ceil of each coordinate
    assert np.linalg.norm(rounded, axis=1).max() <= bound
    # each coordinate is a shifted Bernoulli (variance <= 1/4): 6 sigma on the mean of `draws` draws
    assert np.abs(rounded.mean(axis=0) - scale * x).max() <= 6 * 0.5 / math.sqrt(draws)


def test_conditional_rounding_rejects_and_retries():
    """All coordinates at .5 and beta = 0.9: a single draw misses the bound ~30% of the time."""
    rng = np.random.default_rng(3)
    x = np.full(64, 1 / 8)  # norm 1; times 20 -> every coordinate 2.5
    bound = sk.rounded_l2_bound(scale=20.0, l2_clip=1.0, dim=64, beta=0.9)
    passed = failed = 0
    for _ in range(40):
        try:
            out = sk.scale_and_round(x, scale=20.0, l2_clip=1.0, beta=0.9, rng=rng, max_tries=1)
        except PrivacyError as error:
            assert "conditional rounding failed 1 times" in str(error)
            failed += 1
        else:
            assert np.linalg.norm(out) <= bound
            passed += 1
    assert passed and failed
    for _ in range(40):  # with the default number of tries it always succeeds, within the bound
        assert np.linalg.norm(sk.scale_and_round(x, scale=20.0, l2_clip=1.0, beta=0.9, rng=rng)) <= bound


def test_scale_and_round_refuses_unclipped_input():
    with pytest.raises(PrivacyError, match="exceeds l2_clip"):
        sk.scale_and_round(np.ones(4), scale=1.0, l2_clip=1.0, beta=0.1, rng=np.random.default_rng(0))


# ---- accounting --------------------------------------------------------------------------------------------------


def _gaussian_rdp(sigma: float):
    return lambda alpha: alpha / (2 * sigma * sigma)


def test_skellam_rdp_closed_form_both_branches():
    # alpha=8, l2=2, l1=4, mu=50: 8*4/100 + min((15*4 + 24)/(4*2500), 12/100) = 0.32 + 0.0084
    assert sk.skellam_rdp(8, l1=4, l2=2, mu=50) == pytest.approx(0.3284, rel=1e-12)
    # alpha=2, l1=l2=mu=1: 2/2 + min((3 + 6)/4, 3/2) = 1 + 1.5 (the l1 branch)
    assert sk.skellam_rdp(2, l1=1, l2=1, mu=1) == pytest.approx(2.5, rel=1e-12)
    with pytest.raises(PrivacyError, match="alpha=1"):
        sk.skellam_rdp(1, l1=1, l2=1, mu=1)


def test_epsilon_without_subsampling_matches_a_hand_computation():
    # one order: eps = steps * rdp + log(1 - 1/8) - (log(delta) + log(8)) / 7
    rdp = 0.3284
    by_hand = 3 * rdp + math.log(7 / 8) - (math.log(DELTA) + math.log(8)) / 7
    got = sk.epsilon(q=1.0, mu=50, steps=3, l1=4, l2=2, delta=DELTA, orders=[8])
    assert got == pytest.approx(by_hand, rel=1e-12)
    # several orders: the minimum of the per-order values
    orders = [2, 8, 32]
    per_order = [
        3 * (a * 4 / 100 + min(((2 * a - 1) * 4 + 24) / 10_000, 0.12))
        + math.log1p(-1 / a)
        - (math.log(DELTA) + math.log(a)) / (a - 1)
        for a in orders
    ]
    assert sk.epsilon(q=1.0, mu=50, steps=3, l1=4, l2=2, delta=DELTA, orders=orders) == pytest.approx(min(per_order))
    assert sk.epsilon(q=0.0, mu=50, steps=3, l1=4, l2=2, delta=DELTA) == 0.0
    assert sk.epsilon(q=0.5, mu=50, steps=0, l1=4, l2=2, delta=DELTA) == 0.0


def test_subsampled_rdp_limits():
    base = _gaussian_rdp(1.3)
    for alpha in (2, 3, 17, 256):
        assert sk.subsampled_rdp(alpha, 1.0, base) == base(alpha)
        assert sk.subsampled_rdp(alpha, 0.0, base) == 0.0
        values = [sk.subsampled_rdp(alpha, q, base) for q in (1e-4, 1e-2, 0.1, 0.5, 0.9)]
        assert values == sorted(values)  # more sampling, more loss
        assert all(0 < value <= base(alpha) for value in values)
    # large order, tiny q: finite in log space, and close to Opacus' exact subsampled-Gaussian value
    # (measured: sigma=10 gives 5.50e-12 vs 5.15e-12; sigma=1 gives 498.172 vs 498.171, e^{(l-1) eps(l)} ~ e^{5e5})
    from opacus.accountants.analysis.rdp import compute_rdp

    for sigma, rel in ((10.0, 0.1), (1.0, 1e-5)):
        far = sk.subsampled_rdp(1024, 1e-6, _gaussian_rdp(sigma))
        exact = compute_rdp(q=1e-6, noise_multiplier=sigma, steps=1, orders=[1024])[0]
        assert math.isfinite(far) and exact <= far <= exact * (1 + rel)
    with pytest.raises(PrivacyError, match="alpha=1"):
        sk.subsampled_rdp(1, 0.5, base)


def test_subsampled_bound_is_above_opacus_exact_gaussian_rdp():
    """Zhu-Wang's general bound is an upper bound: never below Opacus' exact subsampled-Gaussian RDP."""
    from opacus.accountants.analysis.rdp import compute_rdp

    for sigma in (0.7, 1.0, 2.0):
        for q in (1e-3, 1e-2, 0.1, 0.5):
            orders = [2, 3, 8, 32, 128]
            exact = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
            for alpha, tight in zip(orders, exact, strict=True):
                assert sk.subsampled_rdp(alpha, q, _gaussian_rdp(sigma)) >= tight * (1 - 1e-9)


def _opacus_gaussian_epsilon(q: float, sigma: float, steps: int, orders) -> float:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(orders))
    eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=DELTA)
    return float(eps)


def test_skellam_approaches_the_gaussian_as_the_scale_grows():
    """No subsampling, same integer orders: the only gap is the discretisation surcharge, which vanishes."""
    sigma, steps, dim = 1.0, 10, 10_000
    orders = sk.DEFAULT_ORDERS
    gaussian = _opacus_gaussian_epsilon(1.0, sigma, steps, orders)
    gaps = []
    for l2 in (3.0, 30.0, 300.0, 3000.0):
        l1 = sk.rounded_l1_bound(l2_bound=l2, dim=dim)
        skellam = sk.epsilon(q=1.0, mu=sigma**2 * l2**2, steps=steps, l1=l1, l2=l2, delta=DELTA)
        assert skellam >= gaussian
        gaps.append(skellam / gaussian - 1)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-4


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "measured"),
    [(0.01, 1.0, 100, 1.116), (0.001, 1.0, 1000, 1.004), (0.01, 2.0, 1, 1.012)],
)
def test_subsampled_skellam_is_within_15_percent_of_opacus_gaussian(q, sigma, steps, measured):
    """Large scale (l2 = 1000, d = 1e6), mu = sigma^2 l2^2: Skellam's epsilon vs Opacus' RDP accountant.

    Opacus gets its default fractional orders plus ours, so its value is its tightest; ours must be above it (an
    upper bound) and within 15% -- measured ratios 1.004-1.116 here, the gap being Zhu-Wang's generic factor 3.
    """
    l2, dim = 1000.0, 10**6
    l1 = sk.rounded_l1_bound(l2_bound=l2, dim=dim)
    opacus_orders = sorted({1 + x / 10.0 for x in range(1, 100)} | set(range(12, 64)) | set(sk.DEFAULT_ORDERS))
    gaussian = _opacus_gaussian_epsilon(q, sigma, steps, opacus_orders)
    skellam = sk.epsilon(q=q, mu=sigma**2 * l2**2, steps=steps, l1=l1, l2=l2, delta=DELTA)
    assert gaussian <= skellam <= 1.15 * gaussian
    assert skellam / gaussian == pytest.approx(measured, abs=0.005)


def test_mu_for_inverts_epsilon():
    kwargs = dict(q=0.01, steps=100, l1=1e4, l2=100.0, delta=DELTA)
    mu = sk.mu_for(target_epsilon=2.0, **kwargs)
    assert sk.epsilon(mu=mu, **kwargs) <= 2.0
    assert sk.epsilon(mu=mu / (1 + 1.2 * sk.MU_RELATIVE_TOLERANCE), **kwargs) > 2.0  # within 0.5% of the smallest
    assert sk.mu_for(target_epsilon=2.0, **{**kwargs, "steps": 0}) == 0.0
    with pytest.raises(PrivacyError, match="unreachable"):
        sk.mu_for(target_epsilon=1e-4, **kwargs)


def test_accounting_rejects_bad_values():
    good = dict(q=0.01, mu=1e4, steps=10, l1=1e3, l2=100.0, delta=DELTA)
    for key, bad in (("q", 1.5), ("mu", 0.0), ("steps", -1), ("l1", -1.0), ("delta", 0.0), ("steps", 2.5)):
        with pytest.raises(PrivacyError, match=key):
            sk.epsilon(**{**good, key: bad})
    with pytest.raises(PrivacyError, match="RDP order"):
        sk.epsilon(**good, orders=[1, 2])


def test_rdp_curve_and_conversion_are_what_epsilon_composes():
    kwargs = dict(q=0.02, mu=3e4, l1=1.2e3, l2=120.0)
    curve = sk.rdp_curve(**kwargs, steps=7)
    assert curve.shape == (len(sk.DEFAULT_ORDERS),) and curve.dtype == np.float64
    assert np.all(np.diff(curve) >= 0)  # RDP grows with the order
    # linear in the steps (composition), and at each order the subsampled Skellam bound
    assert np.allclose(curve, 7 * sk.rdp_curve(**kwargs, steps=1), rtol=1e-12)
    base = lambda a: sk.skellam_rdp(a, l1=1.2e3, l2=120.0, mu=3e4)  # noqa: E731
    assert curve[sk.DEFAULT_ORDERS.index(17)] == pytest.approx(7 * sk.subsampled_rdp(17, 0.02, base), rel=1e-12)
    eps = sk.epsilon(**kwargs, steps=7, delta=DELTA)
    assert sk.rdp_to_epsilon(curve, sk.DEFAULT_ORDERS, DELTA) == eps
    orders = [2, 8, 32]
    assert sk.rdp_to_epsilon(sk.rdp_curve(**kwargs, steps=7, orders=orders), orders, DELTA) == sk.epsilon(
        **kwargs, steps=7, delta=DELTA, orders=orders)
    assert np.array_equal(sk.rdp_curve(**kwargs, steps=0, orders=orders), np.zeros(3))


def test_rdp_to_epsilon_fails_closed():
    orders = [2, 8, 32]
    assert sk.rdp_to_epsilon([math.inf] * 3, orders, DELTA) == math.inf
    finite = sk.rdp_to_epsilon([math.inf, 0.5, math.inf], orders, DELTA)
    assert finite == pytest.approx(0.5 + math.log(7 / 8) - (math.log(DELTA) + math.log(8)) / 7)
    assert sk.rdp_to_epsilon([math.nan] * 3, orders, DELTA) == math.inf  # never the 0.0 that max(0, nan) gives
    with pytest.raises(PrivacyError, match="one RDP value per order"):
        sk.rdp_to_epsilon([0.1, 0.2], orders, DELTA)
    with pytest.raises(PrivacyError, match="negative"):
        sk.rdp_to_epsilon([0.1, -0.2, 0.3], orders, DELTA)
    with pytest.raises(PrivacyError, match="delta"):
        sk.rdp_to_epsilon([0.1, 0.2, 0.3], orders, 0.0)


# ---- the ring ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 8, 20, 32, 63, 64])
def test_unwrap_inverts_wrap_in_range(bits):
    rng = np.random.default_rng(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    values = rng.integers(low, high, size=10_000, dtype=np.int64, endpoint=False)
    values[:2] = [low, high - 1]
    ring = sk.wrap(values, bits)
    assert ring.dtype == np.uint64 and (bits == 64 or int(ring.max()) < 2**bits)
    assert np.array_equal(sk.unwrap(ring, bits), values)


@pytest.mark.parametrize("bits", [8, 32, 64])
def test_wrap_of_a_sum_is_the_sum_of_wraps(bits):
    rng = np.random.default_rng(100 + bits)
    parts = [rng.integers(-(2**40), 2**40, size=1000, dtype=np.int64) for _ in range(5)]
    mask = np.uint64((1 << bits) - 1)
    ring_sum = np.zeros(1000, dtype=np.uint64)
    for part in parts:
        ring_sum = (ring_sum + sk.wrap(part, bits)) & mask  # uint64 addition wraps mod 2^64
    assert np.array_equal(ring_sum, sk.wrap(sum(parts), bits))


def test_ring_errors():
    with pytest.raises(PrivacyError, match="integer"):
        sk.wrap(np.array([0.5]), 8)
    with pytest.raises(PrivacyError, match="2\\^8"):
        sk.unwrap(np.array([256], dtype=np.uint64), 8)
    with pytest.raises(PrivacyError, match="bits=65"):
        sk.wrap(np.array([1]), 65)


def test_bits_for_sizes_the_ring_and_the_aggregate_decodes():
    rng = np.random.default_rng(11)
    sites, dim, linf, mu, tail = 10, 100_000, 100.0, 1e4, 1e-6
    bits = sk.bits_for(num_sites=sites, dim=dim, signal_linf=linf, mu=mu, tail=tail)
    magnitude = sites * 100 + sk.skellam_tail_bound(mu=mu, prob=tail / dim)
    assert magnitude < 2 ** (bits - 1) and magnitude >= 2 ** (bits - 2)  # enough, and one bit fewer is not
    # worst-case signals (every coordinate at +linf) plus the noise shares, added in the ring, decode exactly
    mask = np.uint64((1 << bits) - 1)
    ring_sum = np.zeros(dim, dtype=np.uint64)
    true_sum = np.zeros(dim, dtype=np.int64)
    for _ in range(sites):
        contribution = np.full(dim, int(linf), dtype=np.int64) + sk.sample(mu / sites, dim, rng)
        true_sum += contribution
        ring_sum = (ring_sum + sk.wrap(contribution, bits)) & mask
    assert np.array_equal(sk.unwrap(ring_sum, bits), true_sum)
    # more sites, more noise, a smaller tail: never fewer bits
    assert sk.bits_for(num_sites=1000, dim=dim, signal_linf=linf, mu=mu, tail=tail) >= bits
    assert sk.bits_for(num_sites=sites, dim=dim, signal_linf=linf, mu=1e8, tail=tail) >= bits
    assert sk.bits_for(num_sites=sites, dim=dim, signal_linf=linf, mu=mu, tail=1e-12) >= bits
    assert sk.bits_for(num_sites=1, dim=1, signal_linf=0.0, mu=0.0) == 1
    with pytest.raises(PrivacyError, match="64"):
        sk.bits_for(num_sites=10, dim=10, signal_linf=2.0**62, mu=1.0)
