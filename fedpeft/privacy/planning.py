"""How much noise a plan needs: the smallest Gaussian noise multiplier or Skellam variance that keeps a history
plus the planned releases within a target epsilon, and the steps one round of local DP-SGD takes.

The epsilons come from ``fedpeft.privacy.accounting`` (what a history spends); this module only searches over them,
so a plan and the later commit of what was released are accounted by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedpeft.errors import PrivacyError
from fedpeft.privacy.accounting import (
    AnyRelease,
    SkellamRelease,
    build_accountant,
    check_delta,
    check_release,
    check_skellam_release,
    history_epsilon,
    is_int,
    is_real,
    merged_mixed,
    rdp_curve,
    rdp_epsilon,
)
from fedpeft.privacy.noise_search import smallest_noise

if TYPE_CHECKING:
    import numpy as np


def _check_target(target_epsilon: Any) -> None:
    if not is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon={target_epsilon!r} is invalid; it must be a finite number > 0")


def _spent_before(prior: list[AnyRelease], delta: float, accountant: str, *, target_epsilon: float,
                  planned: str) -> float:
    spent = history_epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the history alone already spends epsilon={spent:.4g} (delta={delta:g}, {accountant}), which reaches "
            f"the target epsilon={target_epsilon:g}; no noise allows {planned}. Train nothing more, or raise the "
            "target"
        )
    return spent


def _prior_rdp(prior: list[AnyRelease]) -> np.ndarray:
    """The summed RDP curve (``skellam.DEFAULT_ORDERS``) of an already validated prior history of finite epsilon."""
    gaussian, skellam_releases = merged_mixed(prior)
    return rdp_curve(gaussian, skellam_releases)


def _has_skellam(history: Sequence[AnyRelease]) -> bool:
    return any(isinstance(release, SkellamRelease) and release.steps > 0 for release in history)


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    accountant: str = "prv",
    history: Sequence[AnyRelease] = (),
) -> float:
    """Smallest noise multiplier (within the tolerance) such that ``history`` plus ``steps`` more steps at
    ``sample_rate`` stays at or below ``target_epsilon``: how much noise the remaining rounds need.

    ``history`` may hold ``SkellamRelease``s; the epsilon is then ``history_epsilon``'s, i.e. RDP whatever
    ``accountant`` says (a Gaussian-only history gives exactly the answer ``epsilon`` always gave)."""
    _check_target(target_epsilon)
    check_release((1.0, sample_rate, steps), where="planned release")
    if steps < 1:
        raise PrivacyError(f"steps={steps!r}: planning needs at least one step; zero steps need no noise")
    prior = list(history)
    spent = _spent_before(prior, delta, accountant, target_epsilon=target_epsilon, planned=f"{steps} more steps")

    if _has_skellam(prior):  # RDP throughout: the prior's curve once, then one Gaussian curve per candidate
        from fedpeft.privacy import skellam
        from fedpeft.privacy.rdp_cache import gaussian_rdp

        prior_curve = _prior_rdp(prior)

        def eps_at(sigma: float) -> float:
            curve = gaussian_rdp(sample_rate=float(sample_rate), noise_multiplier=sigma, steps=int(steps),
                                 orders=skellam.DEFAULT_ORDERS)
            return rdp_epsilon(prior_curve + curve, delta)
    else:

        def eps_at(sigma: float) -> float:
            return history_epsilon([*prior, (sigma, float(sample_rate), int(steps))], delta, accountant)

    sigma, eps = smallest_noise(eps_at, target_epsilon)
    if eps > target_epsilon:
        raise PrivacyError(
            f"target epsilon={target_epsilon:g} is unreachable: even noise_multiplier={sigma:g} gives "
            f"epsilon={eps:.4g} for {steps} steps at sample_rate={sample_rate:g} (delta={delta:g}, "
            f"{accountant}, epsilon spent before: {spent:.4g}). Raise the target, or plan fewer steps or a "
            "smaller sample rate"
        )
    return sigma


def skellam_mu_for(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    l1: float,
    l2: float,
    steps: int,
    accountant: str = "prv",
    history: Sequence[AnyRelease] = (),
) -> float:
    """The smallest total Skellam variance ``mu`` (to within ``skellam.MU_RELATIVE_TOLERANCE``) such that
    ``history`` plus ``SkellamRelease(sample_rate, mu, l1, l2, steps)`` stays at or below ``target_epsilon`` as
    ``history_epsilon`` accounts it: the noise the remaining distributed rounds need (``steps`` = those rounds).

    Accounted by RDP whatever ``accountant`` says (the result holds a Skellam release; see ``history_epsilon``), so
    a prior spent by PRV may leave less room than PRV's number suggests. Epsilon decreases in ``mu``, so a
    bisection on ``log mu`` (the prior's RDP curve computed once) brackets it, and the returned upper end is
    checked against ``history_epsilon`` itself. Raises PrivacyError when the history alone reaches the target, or
    when even unbounded noise cannot meet it (the RDP conversion's floor, plus the prior's own RDP).
    """
    from fedpeft.privacy import skellam

    _check_target(target_epsilon)
    build_accountant(accountant)
    check_delta(delta)
    check_skellam_release(SkellamRelease(sample_rate, 1.0, l1, l2, steps), where="planned release")
    if steps < 1:
        raise PrivacyError(f"steps={steps!r}: planning needs at least one round; zero rounds need no noise")
    q, l1, l2, steps = float(sample_rate), float(l1), float(l2), int(steps)
    prior = list(history)
    spent = _spent_before(prior, delta, accountant, target_epsilon=target_epsilon,
                          planned=f"{steps} more Skellam release(s)")
    prior_curve = _prior_rdp(prior)

    def eps_at(mu: float) -> float:
        return rdp_epsilon(prior_curve + skellam.rdp_curve(q=q, mu=mu, l1=l1, l2=l2, steps=steps), delta)

    huge = 1e12 * (l2 * l2 + 1.0)
    floor = eps_at(huge)
    if floor > target_epsilon:
        raise PrivacyError(
            f"target epsilon={target_epsilon:g} is unreachable: even Skellam variance mu={huge:.3g} gives "
            f"epsilon={floor:.4g} for {steps} release(s) at sample_rate={q:g} (delta={delta:g}; with a Skellam "
            f"release the whole history is accounted by RDP; epsilon spent before: {spent:.4g}). Raise the target, "
            "or plan fewer rounds or a smaller sample rate"
        )
    hi = l2 * l2  # the Gaussian-equivalent noise multiplier 1
    while eps_at(hi) > target_epsilon:
        hi *= 4.0
    lo = hi / 4.0
    while eps_at(lo) <= target_epsilon:  # ends: epsilon grows without bound as mu -> 0 (q > 0, steps > 0)
        hi, lo = lo, lo / 4.0
    while hi / lo > 1.0 + skellam.MU_RELATIVE_TOLERANCE:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    # history_epsilon merges equal settings, so its float sum may differ from prior_curve + curve in the last bit.
    for _ in range(100):
        if history_epsilon([*prior, SkellamRelease(q, hi, l1, l2, steps)], delta, accountant) <= target_epsilon:
            return hi
        hi *= 1.0 + skellam.MU_RELATIVE_TOLERANCE / 10.0
    raise PrivacyError(  # unreachable in practice: the curves agree to rounding
        f"could not confirm a Skellam variance for target epsilon={target_epsilon:g}; report this as a bug"
    )


def planned_steps(num_examples: int, batch_size: int, local_epochs: int, max_steps: int = 0) -> tuple[float, int]:
    """``(sample_rate, steps)`` of one round of local DP-SGD: q = batch_size / num_examples (at most 1) and
    local_epochs * ceil(1/q) steps, capped by ``max_steps`` when it is > 0."""
    for name, value, minimum in (
        ("num_examples", num_examples, 1),
        ("batch_size", batch_size, 1),
        ("local_epochs", local_epochs, 1),
        ("max_steps", max_steps, 0),
    ):
        if not is_int(value) or value < minimum:
            raise PrivacyError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")
    if batch_size >= num_examples:
        return 1.0, _capped(local_epochs, max_steps)
    # Integer ceil: a float 1/q can land just above an integer (e.g. 1024/16) and add a phantom step.
    steps_per_epoch = -(-num_examples // batch_size)
    return batch_size / num_examples, _capped(local_epochs * steps_per_epoch, max_steps)


def _capped(steps: int, max_steps: int) -> int:
    return min(steps, max_steps) if max_steps > 0 else steps
