"""Distributed example-level DP: one DP-SGD step per round across the sites, with the noise split among them.

Each sampled site Poisson-samples its rows at rate q, sums their clipped gradients, scales the sum and rounds it to
integers at random (``floor(s * G + U)``, U uniform), and adds a Skellam share of variance mu / m (Agarwal, Kairouz,
Liu 2021).

Sensitivity of the rounded sum: couple the rounding of neighbouring datasets through the same U; then each
coordinate's rounded values differ by less than the unrounded difference plus 1, so ``l2 <= s*C + sqrt(d)`` and
``l1 <= sqrt(d) * l2`` for every U. The mechanism is a mixture over U of Skellam mechanisms with these
sensitivities, and Rényi divergence is jointly quasi-convex (van Erven and Harremoës 2014, Theorem 13), so the
mixture's RDP is at most each component's; Poisson subsampling then amplifies it as for any mechanism. Rounding the
site's *sum* once (not each row) costs one vector of random numbers per round; with s*C = 32 sqrt(d) the sqrt(d)
term adds about 3 % to the sensitivity. Skellam noise is closed under summation, so a
secure sum over at least m sites carries Skellam noise of variance >= mu: exactly one Poisson-subsampled Skellam
release per round, accounted at every site (each example is in one site's sum only). The server sees the sum alone,
divides by the scale and the expected batch, and takes the optimizer step (post-processing).

The parameters are public and derived the same way at every party from the run config (``plan``); only mu is
derived from each site's own remaining budget (the site's ledger), and every site in a round must use the same
mu: it is derived from the run's target epsilon and rounds, which all sites share, and a site whose policy asks
for less epsilon refuses rather than adding a different share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedpeft.config import RunConfig
from fedpeft.errors import PrivacyError
from fedpeft.privacy import skellam

SCALE_PER_ROOT_DIM = 32.0  # s * C = 32 sqrt(d): rounding adds sqrt(d) to the sensitivity, about 3 %


@dataclass(frozen=True)
class DistributedPlan:
    """One round's public parameters: the same at every site and at the server."""

    sample_rate: float  # q: each row is in a round's batch with this probability
    clip: float  # C: each row's gradient is clipped to this L2 norm
    scale: float  # s: integer units per unit of gradient
    dim: int  # values per upload (before the row-count coordinate)
    cohort: int  # m: the fewest sites whose noise shares are in any decoded sum
    bits: int  # the ring Z_2^bits of the secure sum
    l2: float  # sensitivity after rounding (integer units)
    l1: float
    mu: float = 0.0  # Skellam variance of the whole sum (integer units); 0 until a site's budget sets it

    @property
    def share(self) -> float:
        return self.mu / self.cohort


def plan(cfg: RunConfig, *, dim: int, cohort: int, max_rows: int) -> DistributedPlan:
    """The public parameters for ``dim`` values, ``cohort`` sites and at most ``max_rows`` rows at any site."""
    p = cfg.privacy
    q = p.sample_rate or 1.0
    scale = SCALE_PER_ROOT_DIM * math.sqrt(dim) / p.max_grad_norm
    l2 = scale * p.max_grad_norm + math.sqrt(dim)
    l1 = skellam.rounded_l1_bound(l2_bound=l2, dim=dim)
    return DistributedPlan(q, p.max_grad_norm, scale, dim, cohort, 0, l2, l1)


def with_noise(base: DistributedPlan, mu: float, *, num_sites: int, max_rows: int) -> DistributedPlan:
    """``base`` with its noise variance and the ring bits the sum then needs (no wrap-around, with high
    probability: Poisson batches up to mean + 8 sd rows per site, every row's scaled gradient at its bound in one
    coordinate)."""
    rows = base.sample_rate * max_rows
    batch = math.ceil(rows + 8 * math.sqrt(rows) + 1)
    signal = batch * base.scale * base.clip + 1 + max_rows  # the row count rides as the last value
    bits = skellam.bits_for(num_sites=num_sites, dim=base.dim + 1, signal_linf=signal, mu=mu)
    return replace(base, mu=mu, bits=max(bits, 8))


def round_sum(gradient_sum: Any, *, plan_: DistributedPlan, rng: np.random.Generator) -> np.ndarray:
    """``floor(s * G + U)``: the scaled sum rounded at random, unbiased (int64)."""
    scaled = np.asarray(gradient_sum, dtype=np.float64).reshape(-1) * plan_.scale
    return np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)


def release(gradient_sum: Any, *, plan_: DistributedPlan, num_rows: int, rng: np.random.Generator) -> np.ndarray:
    """The site's upload: its sampled rows' clipped-gradient sum, scaled and rounded, plus its Skellam share, and
    its row count as the last value (the server divides by the expected batch q * the rows of the sites in it)."""
    if plan_.mu <= 0:
        raise PrivacyError("distributed DP: the round's noise variance is not set; the site's budget plans it "
                           "before any release")
    total = round_sum(gradient_sum, plan_=plan_, rng=rng) + skellam.sample(plan_.share, plan_.dim, rng)
    return np.concatenate([total, [num_rows]]).astype(np.int64)


def sample_rows(num_rows: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson sampling: each row independently with probability ``rate`` (the amplification the accounting uses)."""
    return np.flatnonzero(rng.random(num_rows) < rate)


def decode(ring_sum: np.ndarray, plan_: DistributedPlan) -> tuple[np.ndarray, float]:
    """The gradient sum (in gradient units) and the expected batch q * rows from the decoded integer sum."""
    values = skellam.unwrap(np.asarray(ring_sum, dtype=np.uint64), plan_.bits).astype(np.float64)
    return values[:-1] / plan_.scale, plan_.sample_rate * float(values[-1])
