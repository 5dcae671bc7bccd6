"""The server's side of distributed DP: plan a round's public parameters, send them, decode the integer sum.

The server never adds noise here and never sees one site's sum: the sites' Skellam shares are in the secure sum,
which the server reduces from the ring, divides by the scale and hands to the aggregation pipeline as the noisy
clipped-gradient sum with the expected batch as its weight (the rule ``server-sgd`` then steps).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedpeft import wire
from fedpeft.config import RunConfig
from fedpeft.privacy import distributed, skellam
from fedpeft.secagg.graph import default_degree, default_threshold
from fedpeft.secagg.server import SecureSum
from fedpeft.secagg.vector import unflatten
from fedpeft.server.collect import RoundCollection, SiteIdentities, secure_metrics, weight_sum_integrity


def cohort(cfg: RunConfig, sampled: int) -> int:
    """m: the configured minimum, else the secure-aggregation threshold (no sum decodes with fewer sites)."""
    degree = min(cfg.secagg.degree or default_degree(sampled), sampled - 1)
    return max(cfg.privacy.min_cohort, cfg.secagg.threshold or default_threshold(degree))


def round_plan(cfg: RunConfig, *, dim: int, sampled: int) -> distributed.DistributedPlan:
    """The round's public parameters, with the noise of a fresh run at the run's target epsilon (each site checks
    them and adds more noise itself where its own ledger needs more)."""
    p = cfg.privacy
    max_rows = int(cfg.secagg.max_weight)
    base = distributed.plan(cfg, dim=dim, cohort=cohort(cfg, sampled), max_rows=max_rows)
    mu = skellam.mu_for(target_epsilon=p.target_epsilon, q=base.sample_rate, steps=cfg.federation.rounds,
                        l1=base.l1, l2=base.l2, delta=p.delta)
    return distributed.with_noise(base, mu, num_sites=sampled, max_rows=max_rows)


def instructions(plan: distributed.DistributedPlan) -> dict[str, Any]:
    return {wire.DDP_SCALE: plan.scale, wire.DDP_BITS: plan.bits, wire.DDP_COHORT: plan.cohort,
            wire.DDP_MU: plan.mu}


def collect(secure: SecureSum, template: dict[str, Any], plan: distributed.DistributedPlan, *,
            max_rows: float = math.inf, identities: SiteIdentities | None = None) -> RoundCollection:
    """The decoded noisy gradient sum, weighted by the expected batch of the sites in it. A decoded row count that
    honest sites cannot produce (1 to ``max_rows`` rows each; a site does not refuse more rows than
    ``secagg.max_weight``, so by default only the lower bound holds) fails the round as an integrity failure."""
    assert secure.ring is not None, "a distributed-DP round decodes an integer sum"
    gradient_sum, expected_batch = distributed.decode(np.asarray(secure.ring), plan)
    out = secure_metrics(secure, identities=identities)
    rows = expected_batch / plan.sample_rate if plan.sample_rate > 0 else math.nan
    out.integrity = weight_sum_integrity(rows, sites=len(secure.survivors), least_each=1.0, most_each=max_rows)
    if out.integrity:
        return out
    out.total.update_sum = unflatten(gradient_sum, template)
    out.total.weight_sum = expected_batch
    out.total.count = len(secure.survivors)
    return out
