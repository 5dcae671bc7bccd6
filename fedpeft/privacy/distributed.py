"""Distributed example-level DP: one DP-SGD step per round across the sites, with the noise split among them.

Each sampled site Poisson-samples its rows at rate q, scales each row's clipped gradient to integers (randomised
rounding, conditioned on the rounded norm so the sensitivity is known: Kairouz, Liu, Steinke 2021), sums them, and
adds a Skellam share of variance mu / m (Agarwal, Kairouz, Liu 2021). Skellam noise is closed under summation, so a
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
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedpeft.config import RunConfig
from fedpeft.errors import PrivacyError
from fedpeft.privacy import skellam

ROUNDING_BETA = math.exp(-0.5)  # TFF's default conditional-rounding parameter
SCALE_PER_ROOT_DIM = 4.0  # s * C = 4 sqrt(d): rounding inflates the sensitivity by about 3 %
MAX_ROUNDING_TRIES = 1000


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
    l2 = skellam.rounded_l2_bound(scale=scale, l2_clip=p.max_grad_norm, dim=dim, beta=ROUNDING_BETA)
    l1 = skellam.rounded_l1_bound(l2_bound=l2, dim=dim)
    return DistributedPlan(q, p.max_grad_norm, scale, dim, cohort, 0, l2, l1)


def with_noise(base: DistributedPlan, mu: float, *, num_sites: int, max_rows: int) -> DistributedPlan:
    """``base`` with its noise variance and the ring bits the sum then needs (no wrap-around, with high
    probability: Poisson batches up to mean + 8 sd rows per site, every row's rounded value at its bound)."""
    rows = base.sample_rate * max_rows
    batch = math.ceil(rows + 8 * math.sqrt(rows) + 1)
    bits = skellam.bits_for(num_sites=num_sites, dim=base.dim + 1, signal_linf=batch * base.l2 + max_rows, mu=mu)
    return replace(base, mu=mu, bits=max(bits, 8))


def round_rows(rows: Any, *, plan_: DistributedPlan, rng: np.random.Generator) -> np.ndarray:
    """Each row times the scale, randomly rounded to integers, redrawn until its norm is within the plan's bound;
    returns the sum of the rounded rows (int64)."""
    scaled = np.asarray(rows, dtype=np.float64) * plan_.scale
    floor = np.floor(scaled)
    frac = scaled - floor
    total = np.zeros(scaled.shape[1], dtype=np.int64)
    pending = np.arange(len(scaled))
    for _ in range(MAX_ROUNDING_TRIES):
        if not len(pending):
            return total
        draws = floor[pending] + (rng.random(frac[pending].shape) < frac[pending])
        ok = np.linalg.norm(draws, axis=1) <= plan_.l2
        total += draws[ok].astype(np.int64).sum(axis=0)
        pending = pending[~ok]
    raise PrivacyError(f"conditional rounding: {len(pending)} rows stayed above the norm bound {plan_.l2:.1f} after "
                       f"{MAX_ROUNDING_TRIES} draws; raise the scale or the clip")


def release(chunks: Iterable[Any], *, plan_: DistributedPlan, num_rows: int, rng: np.random.Generator) -> np.ndarray:
    """The site's upload: the rounded clipped-gradient sum of its sampled rows plus its Skellam share, and its row
    count as the last value (the server divides by the expected batch q * the rows of the sites in the sum)."""
    if plan_.mu <= 0:
        raise PrivacyError("distributed DP: the round's noise variance is not set; the site's budget plans it "
                           "before any release")
    total = np.zeros(plan_.dim, dtype=np.int64)
    for chunk in chunks:
        total += round_rows(chunk, plan_=plan_, rng=rng)
    total += skellam.sample(plan_.share, plan_.dim, rng)
    return np.concatenate([total, [num_rows]]).astype(np.int64)


def sample_rows(num_rows: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson sampling: each row independently with probability ``rate`` (the amplification the accounting uses)."""
    return np.flatnonzero(rng.random(num_rows) < rate)


def decode(ring_sum: np.ndarray, plan_: DistributedPlan) -> tuple[np.ndarray, float]:
    """The gradient sum (in gradient units) and the expected batch q * rows from the decoded integer sum."""
    values = skellam.unwrap(np.asarray(ring_sum, dtype=np.uint64), plan_.bits).astype(np.float64)
    return values[:-1] / plan_.scale, plan_.sample_rate * float(values[-1])
