"""Distributed discrete DP under secure aggregation: the Skellam mechanism's math (pure functions, no state).

Secure aggregation adds integers modulo 2^b, so the noise that makes the *sum* private must be integer too, and each
site must be able to add only a share of it. Skellam noise ``Sk(mu) = Poisson(mu/2) - Poisson(mu/2)`` (variance
``mu``) is integer and closed under summation: ``m`` sites adding ``Sk(mu/m)`` each release exactly ``Sk(mu)`` in the
sum, whatever any single site sees. The pipeline, as TensorFlow Federated's ``DistributedDpSumFactory``:

1. each site clips its update to L2 norm ``l2_clip``, multiplies it by ``scale`` and rounds it to integers with
   conditional randomized rounding (``scale_and_round``), so its integer vector has L2 norm at most
   ``rounded_l2_bound(...)`` -- the sensitivity ``l2`` the accountant uses (``rounded_l1_bound`` gives ``l1``);
2. adds ``sample(mu / num_sites, ...)`` and ``wrap``s the result into the ring of ``bits_for(...)`` bits;
3. the server ``unwrap``s the aggregated sum and divides by ``scale``.

Every sensitivity and variance here is in the scaled integer domain (units of ``1/scale``): the Skellam RDP bound
is not scale invariant (its discretisation term shrinks as ``scale`` grows), so mixing domains would be wrong.

Sources: Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021
(arXiv:2110.04995); Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML 2021 (arXiv:2102.06387); Zhu, Wang, "Poisson Subsampled Renyi Differential Privacy",
ICML 2019; Balle et al., "Hypothesis Testing Interpretations and Renyi Differential Privacy", AISTATS 2020; the
reference accounting code is google-research/federated ``distributed_dp/accounting_utils.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

from fedpeft.errors import PrivacyError

# Integer RDP orders: fine up to 256 (where optima for DP-SGD-like settings lie), then a few large ones for very
# small epsilons / very many steps. The subsampling bound needs integer orders >= 2.
DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 257)) + (320, 384, 512, 768, 1024)
MAX_ROUNDING_TRIES = 1000
MU_RELATIVE_TOLERANCE = 0.005  # mu_for returns a variance within 0.5% of the smallest one reaching the target
_MAX_POISSON_LAM = 1e15  # numpy's Poisson sampler refuses lam above ~9.2e18; far beyond any sane variance anyway
_MAX_SCALED = 2.0**62  # scaled coordinates must stay inside int64 after rounding


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PrivacyError(f"{name} must be a real number, got {value!r}; pass a float")
    result = float(value)
    if math.isnan(result):
        raise PrivacyError(f"{name} is NaN; pass a finite number")
    return result


def _positive(name: str, value: object, fix: str) -> float:
    result = _real(name, value)
    if not (result > 0 and math.isfinite(result)):
        raise PrivacyError(f"{name}={value!r} must be finite and > 0; {fix}")
    return result


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PrivacyError(f"{name} must be an integer, got {value!r}; pass an int >= {minimum}")
    if int(value) < minimum:
        raise PrivacyError(f"{name}={value!r} must be >= {minimum}")
    return int(value)


def _probability(name: str, value: object, *, closed_low: bool, closed_high: bool) -> float:
    result = _real(name, value)
    low_ok = result >= 0 if closed_low else result > 0
    high_ok = result <= 1 if closed_high else result < 1
    if not (low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise PrivacyError(f"{name}={value!r} must lie in {interval}")
    return result


def _generator(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise PrivacyError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; use np.random.default_rng()"
        )
    return rng


# ---- noise -------------------------------------------------------------------------------------------------------


def sample(mu: float, shape: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Skellam noise ``Poisson(mu/2) - Poisson(mu/2)`` per coordinate: integer, mean 0, variance ``mu`` (int64).

    Why Skellam: the difference of two independent Poissons is integer (so it passes through secure aggregation's
    modular arithmetic untouched) and closed under summation -- ``Sk(a) + Sk(b) = Sk(a + b)`` because Poisson is --
    so ``m`` sites each calling ``sample(mu / m, ...)`` make the aggregate carry exactly ``Sk(mu)``, the noise the
    accountant (``epsilon``) assumes (Agarwal, Kairouz, Liu 2021, Sec. 3). ``mu = 0`` gives zeros.

    numpy's Poisson sampler is floating-point based, not an exact sampler; the paper and TFF make the same choice.
    """
    mu = _real("mu", mu)
    if not (0 <= mu <= 2 * _MAX_POISSON_LAM):
        raise PrivacyError(f"Skellam variance mu={mu!r} must lie in [0, {2 * _MAX_POISSON_LAM:g}]; lower the noise")
    rng = _generator(rng)
    if mu == 0:
        return np.zeros(shape, dtype=np.int64)
    lam = mu / 2.0
    return rng.poisson(lam, size=shape).astype(np.int64) - rng.poisson(lam, size=shape).astype(np.int64)


def skellam_tail_bound(*, mu: float, prob: float) -> int:
    """The smallest integer ``T`` with ``P(|Sk(mu)| > T) <= prob`` by the Chernoff bound on the Skellam MGF.

    ``E exp(t X) = exp(mu (cosh t - 1))`` for ``X ~ Sk(mu)`` (two Poissons of mean ``mu/2``), so for ``u = x / mu``
    ``P(X >= x) <= exp(-mu h(u))`` with ``h(u) = u asinh(u) - sqrt(1 + u^2) + 1`` (optimal ``t = asinh(u)``); doubled
    for the two-sided tail. Not a Gaussian tail: ``cosh t - 1 >= t^2 / 2``, so Skellam is *not* sub-Gaussian with
    proxy ``mu`` and a ``sqrt(2 mu ln(2/p))`` bound would undercount its (heavier, log-linear) far tail.
    """
    mu = _real("mu", mu)
    if not (mu >= 0 and math.isfinite(mu)):
        raise PrivacyError(f"Skellam variance mu={mu!r} must be finite and >= 0")
    prob = _probability("prob", prob, closed_low=False, closed_high=False)
    if mu == 0:
        return 0
    target = math.log(2.0 / prob) / mu  # need h(x / mu) >= target

    def h(u: float) -> float:
        return u * math.asinh(u) - math.sqrt(1.0 + u * u) + 1.0

    lo, hi = 0.0, 1.0
    while h(hi) < target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # h is increasing on u >= 0: bisect to float precision
        mid = 0.5 * (lo + hi)
        if h(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    # P(|X| >= x) <= prob with x = hi * mu, so P(|X| > ceil(x) - 1) <= prob.
    return max(0, math.ceil(hi * mu) - 1)


# ---- rounding ----------------------------------------------------------------------------------------------------


def rounded_l2_bound(*, scale: float, l2_clip: float, dim: int, beta: float) -> float:
    """L2 norm bound of a conditionally randomized-rounded vector: the integer-domain L2 sensitivity ``l2``.

    With ``c = scale * l2_clip`` (the scaled vector's norm bound) and ``d = dim``, Kairouz, Liu, Steinke 2021
    (Theorem 1 / Proposition 22 of arXiv:2102.06387, as ``rounded_l2_norm_bound`` in google-research/federated's
    ``distributed_dp/accounting_utils.py``):

        min( c + sqrt(d),  sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) * (c + sqrt(d)/2)) )

    The first term holds for every rounding (each coordinate moves by < 1); the second holds with probability
    >= 1 - beta for unconditional randomized rounding, which is why ``scale_and_round`` re-rounds until it holds.
    ``beta = 0`` keeps only the worst-case term (no re-rounding ever needed). Why it matters: rounding adds up to
    ``d/4`` to the squared norm, so without conditioning the sensitivity would grow like ``sqrt(d)``.
    """
    scale = _positive("scale", scale, "pass the factor that maps clipped floats to integers")
    l2_clip = _positive("l2_clip", l2_clip, "pass the L2 clipping norm")
    dim = _integer("dim", dim, 1)
    beta = _probability("beta", beta, closed_low=True, closed_high=False)
    c = scale * l2_clip
    worst_case = c + math.sqrt(dim)
    if beta == 0:
        return worst_case
    squared = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(dim) / 2.0)
    return min(worst_case, math.sqrt(squared))


def rounded_l1_bound(*, l2_bound: float, dim: int) -> float:
    """L1 norm bound of an integer vector with L2 norm <= ``l2_bound``: ``l2_bound * min(sqrt(dim), l2_bound)``.

    Cauchy-Schwarz gives ``L1 <= sqrt(d) L2``; integer coordinates give ``|v_i| <= v_i^2``, so ``L1 <= L2^2``
    (google-research/federated ``rounded_l1_norm_bound``). This is the ``l1`` the Skellam RDP bound needs.
    """
    l2_bound = _positive("l2_bound", l2_bound, "pass rounded_l2_bound(...)")
    dim = _integer("dim", dim, 1)
    return l2_bound * min(math.sqrt(dim), l2_bound)


def scale_and_round(
    x: np.ndarray,
    *,
    scale: float,
    l2_clip: float,
    beta: float,
    rng: np.random.Generator,
    max_tries: int = MAX_ROUNDING_TRIES,
) -> np.ndarray:
    """``x * scale`` randomized-rounded to int64, re-drawn until its L2 norm is <= ``rounded_l2_bound(...)``.

    Each coordinate ``y`` becomes ``floor(y) + Bernoulli(y - floor(y))``: unbiased, so the server's decoded mean is
    unbiased up to the (tiny, for small beta) effect of conditioning. Re-drawing until the norm bound holds is the
    conditional randomized rounding of Kairouz, Liu, Steinke 2021 (Sec. 4.1, Proposition 22): the accountant's
    sensitivity is then a hard bound, not a high-probability one. Each draw passes with probability >= 1 - beta, so
    ``max_tries`` failures mean the input or ``beta`` is wrong, and it raises instead of looping forever.

    ``x`` must already be clipped: ``||x||_2 <= l2_clip`` (checked; privacy depends on it).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise PrivacyError("scale_and_round got an empty vector; pass the flattened, clipped update")
    if not np.all(np.isfinite(x)):
        raise PrivacyError("scale_and_round got a non-finite coordinate (NaN or inf); clip a finite update")
    bound = rounded_l2_bound(scale=scale, l2_clip=l2_clip, dim=int(x.size), beta=beta)
    norm = float(np.linalg.norm(x))
    if norm > l2_clip * (1.0 + 1e-9):
        raise PrivacyError(f"the update's L2 norm {norm:.6g} exceeds l2_clip={l2_clip!r}; clip it to l2_clip first")
    max_tries = _integer("max_tries", max_tries, 1)
    rng = _generator(rng)
    y = x * scale
    if float(np.max(np.abs(y))) >= _MAX_SCALED:
        raise PrivacyError(f"scale={scale!r} pushes coordinates past 2^62 (int64); lower the scale")
    floor = np.floor(y)
    frac = y - floor
    bound_sq = bound * bound
    for _ in range(max_tries):
        rounded = floor + (rng.random(y.shape) < frac)
        if float(np.dot(rounded.ravel(), rounded.ravel())) <= bound_sq:
            return rounded.astype(np.int64)
    raise PrivacyError(
        f"conditional rounding failed {max_tries} times (norm bound {bound:.6g}, beta={beta!r}); each try passes "
        "with probability >= 1 - beta, so use a smaller beta (e.g. exp(-0.5)) or check the clipping"
    )


# ---- accounting --------------------------------------------------------------------------------------------------


def _skellam_rdp_array(alphas: np.ndarray, l1: float, l2: float, mu: float) -> np.ndarray:
    gaussian = alphas * l2 * l2 / (2.0 * mu)
    surcharge = np.minimum(((2.0 * alphas - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu), 3.0 * l1 / (2.0 * mu))
    return gaussian + surcharge


def skellam_rdp(alpha: float, *, l1: float, l2: float, mu: float) -> float:
    """RDP at order ``alpha > 1`` of adding ``Sk(mu)`` (variance ``mu``) to an integer query with sensitivities
    ``Delta1 = l1``, ``Delta2 = l2`` (Agarwal, Kairouz, Liu 2021, Theorem 3.5 and its multi-dimensional corollary):

        alpha * l2^2 / (2 mu) + min( ((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2),  3 l1 / (2 mu) )

    written with ``mu`` = the per-coordinate *variance*, as google-research/federated's ``_skellam_rdp`` evaluates
    it (there in float units: ``s * l2``, ``s * l1``, ``s^2 mu`` substituted gives exactly this). The paper states
    it with the Poisson rate ``mu_p = mu / 2`` (``Sk(mu_p, mu_p)``, variance ``2 mu_p``), i.e. ``/(16 mu_p^2)`` and
    ``3 l1 / (4 mu_p)``; plugging the variance into that form unchanged would understate the surcharge 2-4x.
    The first term is the Gaussian mechanism's RDP at the same variance; the min is the price of discreteness,
    which vanishes as the scale (so ``mu``) grows -- why Skellam matches the Gaussian at high precision.
    """
    alpha = _real("alpha", alpha)
    if not alpha > 1:
        raise PrivacyError(f"RDP order alpha={alpha!r} must be > 1")
    l1 = _positive("l1", l1, "pass rounded_l1_bound(...)")
    l2 = _positive("l2", l2, "pass rounded_l2_bound(...)")
    mu = _positive("mu", mu, "pass the total Skellam variance per coordinate")
    return float(_skellam_rdp_array(np.array([alpha]), l1, l2, mu)[0])


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def _subsampled_from_table(alpha: int, q: float, base: np.ndarray) -> float:
    """Zhu-Wang bound at order ``alpha`` with ``base[l - 2] = eps(l)`` for ``l = 2..alpha``, in log space."""
    if q == 0:
        return 0.0
    eps_alpha = float(base[alpha - 2])
    if q == 1:
        return eps_alpha
    log_q, log_1mq = math.log(q), math.log1p(-q)
    first = (alpha - 1) * log_1mq + math.log1p((alpha - 1) * q)
    second = math.log(alpha * (alpha - 1) / 2.0) + 2 * log_q + (alpha - 2) * log_1mq + float(base[0])
    ls = np.arange(3, alpha + 1, dtype=np.float64)  # empty for alpha = 2
    rest = math.log(3.0) + _log_comb(alpha, ls) + (alpha - ls) * log_1mq + ls * log_q + (ls - 1.0) * base[1 : alpha - 1]
    bound = float(logsumexp(np.concatenate([[first, second], rest])))
    return min(bound / (alpha - 1), eps_alpha)


def subsampled_rdp(alpha: int, q: float, rdp: Callable[[int], float]) -> float:
    """RDP at integer order ``alpha >= 2`` of the mechanism with RDP curve ``rdp`` run on a Poisson subsample (each
    record in with probability ``q``): the general upper bound of Zhu & Wang, ICML 2019 (cited as Theorem 6 of the
    ICML version; google-research/federated's ``_compute_rdp_subsampled`` labels the same bound "Theorem 5"):

        1/(a-1) * log( (1-q)^(a-1) (1 + (a-1) q) + C(a,2) q^2 (1-q)^(a-2) e^{eps(2)}
                       + 3 sum_{l=3..a} C(a,l) (1-q)^(a-l) q^l e^{(l-1) eps(l)} )

    evaluated with ``logsumexp``/``gammaln`` so large ``a`` and tiny ``q`` stay finite. Why this one: it needs only
    the base mechanism's RDP curve (the Skellam bound), unlike Opacus' exact formula which is specific to the
    Gaussian. Capped at ``rdp(alpha)`` -- subsampling never hurts (Renyi divergence is jointly quasi-convex; TFF
    takes the same min) -- so ``q = 1`` returns ``rdp(alpha)`` exactly and ``q = 0`` returns 0.
    """
    alpha = _integer("alpha", alpha, 2)
    q = _probability("q", q, closed_low=True, closed_high=True)
    if not callable(rdp):
        raise PrivacyError(f"rdp must be a function of the order, got {type(rdp).__name__}")
    if q == 0:
        return 0.0
    if q == 1:
        return float(rdp(alpha))
    base = np.array([float(rdp(order)) for order in range(2, alpha + 1)], dtype=np.float64)
    return _subsampled_from_table(alpha, q, base)


def _check_orders(orders: Sequence[int] | None) -> tuple[int, ...]:
    if orders is None:
        return DEFAULT_ORDERS
    checked = tuple(_integer("RDP order", order, 2) for order in orders)
    if not checked:
        raise PrivacyError("orders is empty; pass integer RDP orders >= 2 or None for the defaults")
    return checked


def _rdp_to_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        eps = rdp + np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1.0)
    # A NaN order (inf - inf upstream) proves nothing: it counts as infinite, never as the 0.0 that max() would
    # otherwise make of it.
    return max(0.0, float(np.min(np.where(np.isnan(eps), np.inf, eps))))


def rdp_curve(
    *,
    q: float,
    mu: float,
    l1: float,
    l2: float,
    steps: int,
    orders: Sequence[int] | None = None,
) -> np.ndarray:
    """RDP at each of ``orders`` (default ``DEFAULT_ORDERS``) of ``steps`` rounds of the Poisson-subsampled (rate
    ``q``) Skellam mechanism: ``steps * subsampled_rdp(a, q, skellam_rdp)`` per order, as a float64 array aligned
    with ``orders``.

    The curve is what composes: RDP adds per order across releases of any kind (Mironov 2017), so a history of
    Skellam and Gaussian releases is the sum of their curves at the same orders, turned into one epsilon by
    ``rdp_to_epsilon``. Units as in ``epsilon`` (the scaled integer domain). An entry may be ``inf`` (tiny ``mu``).
    """
    q = _probability("q", q, closed_low=True, closed_high=True)
    mu = _positive("mu", mu, "pass the total Skellam variance per coordinate")
    steps = _integer("steps", steps, 0)
    l1 = _positive("l1", l1, "pass rounded_l1_bound(...)")
    l2 = _positive("l2", l2, "pass rounded_l2_bound(...)")
    checked = _check_orders(orders)
    if steps == 0 or q == 0:
        return np.zeros(len(checked), dtype=np.float64)
    with np.errstate(over="ignore", divide="ignore"):  # a tiny mu gives an infinite RDP, not an error
        base = _skellam_rdp_array(np.arange(2, max(checked) + 1, dtype=np.float64), l1, l2, mu)
        return np.array([_subsampled_from_table(order, q, base) for order in checked], dtype=np.float64) * steps


def rdp_to_epsilon(rdp: Sequence[float] | np.ndarray, orders: Sequence[int], delta: float) -> float:
    """Epsilon at ``delta`` of an RDP curve ``rdp`` given at integer ``orders`` (>= 2, aligned with ``rdp``): the
    conversion of Balle et al. 2020 (Theorem 21 of arXiv:1905.09982), as in ``epsilon`` and Opacus'
    ``get_privacy_spent``, minimised over the orders and floored at 0. An ``inf`` entry only rules its order out;
    a NaN entry counts as ``inf``; an all-``inf`` curve gives ``inf``.
    """
    delta = _probability("delta", delta, closed_low=False, closed_high=False)
    checked = _check_orders(orders)
    values = np.asarray(rdp, dtype=np.float64)
    if values.shape != (len(checked),):
        raise PrivacyError(
            f"rdp has shape {values.shape}, but there are {len(checked)} orders; pass one RDP value per order"
        )
    if np.any(values < 0):
        raise PrivacyError("rdp has a negative entry; Renyi divergences are >= 0, so the curve is wrong")
    return _rdp_to_epsilon(values, np.array(checked, dtype=np.float64), delta)


def epsilon(
    *,
    q: float,
    mu: float,
    steps: int,
    l1: float,
    l2: float,
    delta: float,
    orders: Sequence[int] | None = None,
) -> float:
    """Epsilon at ``delta`` of ``steps`` rounds of the Poisson-subsampled (rate ``q``) Skellam mechanism.

    Per order: ``steps * subsampled_rdp(a, q, skellam_rdp)`` (RDP composes additively, Mironov 2017), then the
    improved RDP-to-DP conversion of Balle et al. 2020 (Theorem 21 of arXiv:1905.09982; Canonne, Kamath, Steinke
    2020), the same as Opacus' ``get_privacy_spent``:

        eps = rdp(a) + log(1 - 1/a) - (log(delta) + log(a)) / (a - 1),   minimised over integer orders a.

    ``l1``, ``l2`` and ``mu`` are in the scaled integer domain (see the module docstring): the sensitivities of
    the rounded values (``rounded_l2_bound`` for conditional rounding of each contribution; fedpeft's one rounding
    of a site's sum: ``fedpeft.privacy.distributed``), ``mu`` the *total* variance of the aggregate's noise.
    """
    checked = _check_orders(orders)
    rdp = rdp_curve(q=q, mu=mu, l1=l1, l2=l2, steps=steps, orders=checked)  # validates q, mu, l1, l2, steps
    delta = _probability("delta", delta, closed_low=False, closed_high=False)
    if steps == 0 or q == 0:
        return 0.0
    return _rdp_to_epsilon(rdp, np.array(checked, dtype=np.float64), delta)


def mu_for(
    *,
    target_epsilon: float,
    q: float,
    steps: int,
    l1: float,
    l2: float,
    delta: float,
    orders: Sequence[int] | None = None,
) -> float:
    """The smallest total Skellam variance ``mu`` (to within 0.5%) whose ``epsilon(...)`` is <= ``target_epsilon``.

    ``epsilon`` decreases in ``mu`` (every term of the RDP bound does, and the subsampling bound is increasing in
    the base RDP), so a bisection on ``log mu`` brackets it; the returned value is the upper end, so its epsilon
    never exceeds the target. Unreachable targets (below the conversion's floor ``min_a log(1 - 1/a) -
    (log delta + log a)/(a - 1)`` that remains even with infinite noise) raise, naming the floor.
    """
    target = _positive("target_epsilon", target_epsilon, "pass the privacy budget to spend")
    checked = _check_orders(orders)

    def eps(mu: float) -> float:
        return epsilon(q=q, mu=mu, steps=steps, l1=l1, l2=l2, delta=delta, orders=checked)

    huge = 1e12 * (_positive("l2", l2, "pass rounded_l2_bound(...)") ** 2 + 1.0)
    floor = eps(huge)
    if floor > target:
        raise PrivacyError(
            f"target_epsilon={target!r} is unreachable: even with variance {huge:.3g} epsilon is {floor:.4g} "
            f"(delta={delta!r}, steps={steps!r}, q={q!r}); raise target_epsilon or delta, take fewer steps or a "
            "smaller q, or pass larger RDP orders"
        )
    if _integer("steps", steps, 0) == 0 or _real("q", q) == 0:  # nothing released about anyone: no noise needed
        return 0.0
    hi = l2 * l2
    while eps(hi) > target:
        hi *= 4.0
    lo = hi / 4.0
    while eps(lo) <= target:  # terminates: epsilon grows without bound as mu -> 0 (q > 0, steps > 0)
        hi, lo = lo, lo / 4.0
    while hi / lo > 1.0 + MU_RELATIVE_TOLERANCE:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# ---- the ring ----------------------------------------------------------------------------------------------------


def bits_for(*, num_sites: int, dim: int, signal_linf: float, mu: float, tail: float = 1e-6) -> int:
    """Ring bits ``b`` so that the aggregate stays in ``[-2^(b-1), 2^(b-1))`` in every coordinate with probability
    >= ``1 - tail`` per round, i.e. ``unwrap`` recovers the true integer sum.

    The sum of ``num_sites`` rounded signals with ``|coordinate| <= signal_linf`` is at most
    ``num_sites * floor(signal_linf)`` per coordinate (deterministic); the aggregate noise ``Sk(mu)`` is at most
    ``T = skellam_tail_bound(mu=mu, prob=tail / dim)`` per coordinate except with probability ``tail / dim``
    (Chernoff bound on the Skellam MGF), so with probability ``>= 1 - tail`` over all ``dim`` coordinates (union
    bound) ``|sum| <= M = num_sites * floor(signal_linf) + T`` and ``b = bit_length(M) + 1`` suffices.
    ``signal_linf = rounded_l2_bound(...)`` is the rigorous worst case; a smaller value (e.g. after a random
    rotation flattens the vector, as TFF does) is the caller's claim to make.
    """
    num_sites = _integer("num_sites", num_sites, 1)
    dim = _integer("dim", dim, 1)
    signal_linf = _real("signal_linf", signal_linf)
    if not (signal_linf >= 0 and math.isfinite(signal_linf)):
        raise PrivacyError(f"signal_linf={signal_linf!r} must be finite and >= 0; pass each site's max |coordinate|")
    tail = _probability("tail", tail, closed_low=False, closed_high=False)
    noise = skellam_tail_bound(mu=mu, prob=tail / dim)
    magnitude = num_sites * math.floor(signal_linf) + noise
    bits = int(magnitude).bit_length() + 1
    if bits > 64:
        raise PrivacyError(
            f"the aggregate needs {bits} bits (|sum| up to {magnitude}), more than the 64 of the ring; "
            "lower the scale or the noise"
        )
    return bits


def _check_bits(bits: object) -> int:
    bits = _integer("bits", bits, 1)
    if bits > 64:
        raise PrivacyError(f"bits={bits} exceeds 64; the ring is uint64, use bits_for(...) <= 64")
    return bits


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def wrap(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers to the ring ``Z / 2^bits`` (uint64 in ``[0, 2^bits)``): ``values mod 2^bits``.

    Secure aggregation adds masked vectors modulo ``2^bits``; since reduction mod ``2^bits`` is a ring
    homomorphism, ``wrap(a + b) == (wrap(a) + wrap(b)) mod 2^bits`` and any int64 input is fine (two's complement
    cast, then mask).
    """
    bits = _check_bits(bits)
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise PrivacyError(f"wrap needs integer values, got dtype {array.dtype}; round them first (scale_and_round)")
    return array.astype(np.int64).astype(np.uint64) & _mask(bits)


def unwrap(ring: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements back to int64 by the centered lift: ``v >= 2^(bits-1)`` maps to ``v - 2^bits``.

    The result lies in ``[-2^(bits-1), 2^(bits-1))``; it equals the true integer sum whenever that sum lies there
    (what ``bits_for`` sizes the ring for).
    """
    bits = _check_bits(bits)
    array = np.asarray(ring)
    if array.dtype.kind not in "iu":
        raise PrivacyError(f"unwrap needs ring elements (unsigned integers), got dtype {array.dtype}")
    if array.dtype.kind == "i" and array.size and int(array.min()) < 0:
        raise PrivacyError("unwrap got negative ring elements; pass wrap(...)'s uint64 output")
    array = array.astype(np.uint64)
    if bits < 64 and array.size and int(array.max()) >> bits:
        raise PrivacyError(f"unwrap got a ring element >= 2^{bits}; reduce it mod 2^{bits} (mask) first")
    shift = np.uint64(64 - bits)  # sign extension: move bit (bits-1) to the int64 sign bit, shift back arithmetically
    return (array << shift).view(np.int64) >> np.int64(64 - bits)
