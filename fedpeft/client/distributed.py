"""A site's side of distributed DP: one round is one DP step, the site releases its noisy clipped-gradient sum.

Before anything is computed the site re-derives the round's public parameters from its own run config and checks
the server's (a server cannot talk a site into less noise or a smaller cohort), asks its ledger for the noise this
round needs, and refuses (a typed refusal) when the policy, the budget or the cohort forbids the round. The noise
is drawn from the operating system's entropy, never from the run's seed: a seed the server knows would let it
subtract the noise.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import replace
from typing import Any

import numpy as np

from fedpeft import wire
from fedpeft.config import RunConfig
from fedpeft.errors import PolicyViolation, PrivacyBudgetExceeded, PrivacyError
from fedpeft.messaging import as_float, as_int
from fedpeft.privacy import distributed
from fedpeft.privacy.policy import SitePolicy
from fedpeft.privacy.site_budget import SiteBudget

RELATIVE_TOLERANCE = 1e-9
MAX_NOISE_FACTOR = 4.0  # a site needing more than 4x the round's variance (2x its noise) refuses


def checked_plan(cfg: RunConfig, instructions: dict[str, Any], *, dim: int, policy: SitePolicy | None) -> \
        distributed.DistributedPlan:
    """The round's plan as this site derives it, after checking the server's announced parameters against it."""
    announced = {key: instructions.get(key) for key in (wire.DDP_SCALE, wire.DDP_BITS, wire.DDP_COHORT, wire.DDP_MU)}
    if any(value is None for value in announced.values()):
        raise PrivacyError("distributed DP: the round's instructions lack its public parameters "
                           f"({sorted(k for k, v in announced.items() if v is None)}); the site releases nothing")
    cohort = as_int(announced[wire.DDP_COHORT])
    own_cohort = max(cfg.privacy.min_cohort, policy.min_cohort if policy else 0)
    if cohort < own_cohort:
        raise PolicyViolation(f"distributed DP: the round's cohort {cohort} is below this site's minimum {own_cohort}",
                              rule="min_cohort")
    base = distributed.plan(cfg, dim=dim, cohort=cohort, max_rows=int(cfg.secagg.max_weight))
    if not math.isclose(as_float(announced[wire.DDP_SCALE]), base.scale, rel_tol=RELATIVE_TOLERANCE):
        raise PrivacyError(f"distributed DP: the server's scale {announced[wire.DDP_SCALE]} is not the run's "
                           f"{base.scale:g}; the site releases nothing")
    return replace(base, mu=as_float(announced[wire.DDP_MU]), bits=as_int(announced[wire.DDP_BITS]))


def noise_share(plan: distributed.DistributedPlan, *, needed_mu: float, accepts_shares: bool) -> float:
    """This site's Skellam share: mu / m when it trusts the cohort's shares, plus whatever its own ledger needs
    beyond the round's mu (the other m - 1 shares carry (m - 1) mu / m); its whole need when it accepts no shares."""
    if not accepts_shares:
        return needed_mu
    return max(plan.share, needed_mu - (plan.cohort - 1) * plan.share)


def release(model_method: Any, model: Any, data: Any, plan: distributed.DistributedPlan, *,
            share: float) -> np.ndarray:
    """The upload: the rounded clipped-gradient sum of a Poisson sample of the rows, plus the noise share."""
    rng = np.random.default_rng(secrets.randbits(128))
    rows = distributed.sample_rows(model_method.num_rows(data), plan.sample_rate, rng)
    gradient_sum = model_method.clipped_gradient_sum(model, data, rows, plan.clip)
    shared = replace(plan, mu=share * plan.cohort)  # release() adds mu / cohort = this site's share
    return distributed.release(gradient_sum, plan_=shared, num_rows=model_method.num_rows(data), rng=rng)


def site_round(*, budget: SiteBudget, server_round: int, plan: distributed.DistributedPlan) -> tuple[float, Any]:
    """The noise variance this round needs at this site (its ledger's remaining budget), checked before release.

    A site whose remaining budget needs far more noise than the round is planned for refuses instead of joining:
    its extra noise would be in everyone's sum (a nearly spent budget needs unbounded noise), drowning the other
    sites' signal while its own data teaches nothing. ``MAX_NOISE_FACTOR`` leaves room for a site whose policy
    budget is lower than the run's (epsilon 4 in an epsilon-8 run needs about 3.3 times the variance)."""
    planned = budget.plan_distributed(server_round, sample_rate=plan.sample_rate, l1=plan.l1, l2=plan.l2,
                                      scale=plan.scale, cohort=plan.cohort)
    if plan.mu > 0 and planned.mu > MAX_NOISE_FACTOR * plan.mu:
        spent = budget.ledger.epsilon_spent()
        raise PrivacyBudgetExceeded(
            f"site {budget.site}: its remaining budget (epsilon {spent:.3g} of {budget.budget:g} spent) needs "
            f"{planned.mu / plan.mu:.3g} times the noise this round is planned for (at most {MAX_NOISE_FACTOR:g}); "
            "joining would drown the other sites' signal, so the site releases nothing. Its budget is its own across "
            "runs on the same data: to start afresh on purpose in a simulation, set privacy.ledger_dir to a new "
            "directory (e.g. runs/{run}/sites); a deployed site raises max_epsilon in its policy or stops")
    return planned.mu, planned
