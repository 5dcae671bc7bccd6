"""Epsilon of DP-SGD releases: a thin facade over Opacus' accountants (pure math, no state of its own).

A release is ``(noise_multiplier, sample_rate, steps)``, exactly one entry of an Opacus accountant's ``history``:
``steps`` Poisson-subsampled Gaussian steps at sampling rate ``sample_rate`` and noise ``noise_multiplier``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from fedpeft.errors import PrivacyError

Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
ACCOUNTANTS = ("prv", "rdp")
MAX_NOISE_MULTIPLIER = 1e4
EPSILON_TOLERANCE = 0.01  # as opacus.accountants.utils.get_noise_multiplier


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(
            f"accountant {accountant!r} is unknown; use one of {', '.join(ACCOUNTANTS)} "
            "('prv' is tighter, 'rdp' is faster)"
        )


def check_delta(delta: Any) -> None:
    if not _is_real(delta) or not 0.0 < delta < 1.0:
        raise PrivacyError(
            f"delta={delta!r} is invalid: it must be a number strictly between 0 and 1 "
            "(customarily below 1/num_examples, e.g. 1e-5)"
        )


def check_release(release: Any, where: str = "release") -> Release:
    """Validate one ``(noise_multiplier, sample_rate, steps)`` and return it with plain Python types."""
    if not isinstance(release, Sequence) or isinstance(release, str) or len(release) != 3:
        raise PrivacyError(f"{where}={release!r} is not a (noise_multiplier, sample_rate, steps) triple; pass one")
    sigma, q, steps = release
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise PrivacyError(
            f"{where}: noise_multiplier={sigma!r} is invalid; it must be a finite number >= 0 (0 means no noise)"
        )
    if not _is_real(q) or not 0.0 < q <= 1.0:
        raise PrivacyError(
            f"{where}: sample_rate={q!r} is invalid; it must be in (0, 1] (batch_size / num_examples)"
        )
    if not _is_int(steps) or steps < 0:
        raise PrivacyError(f"{where}: steps={steps!r} is invalid; it must be an integer >= 0")
    return (float(sigma), float(q), int(steps))


def _merged(history: Sequence[Release]) -> list[Release]:
    """Validated releases with steps > 0, steps summed per (noise_multiplier, sample_rate).

    Composition is commutative, so merging is exact; it makes split and unsplit histories give identical numbers
    and keeps a long ledger of same-setting rounds as cheap as a single release for the PRV accountant.
    """
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise PrivacyError(f"history={history!r} is not a sequence of (noise_multiplier, sample_rate, steps)")
    steps_by_setting: dict[tuple[float, float], int] = {}
    for index, release in enumerate(history):
        sigma, q, steps = check_release(release, where=f"history[{index}]")
        if steps > 0:
            steps_by_setting[(sigma, q)] = steps_by_setting.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in steps_by_setting.items()]


def _accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    return PRVAccountant() if name == "prv" else RDPAccountant()


def epsilon(history: Sequence[Release], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of all releases in ``history`` composed; 0.0 when nothing was released."""
    check_accountant(accountant)
    check_delta(delta)
    releases = _merged(history)
    if not releases:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in releases):
        return math.inf
    opacus_accountant = _accountant(accountant)
    opacus_accountant.history = releases
    return float(opacus_accountant.get_epsilon(delta=delta))


def _check_target(target_epsilon: Any) -> None:
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon={target_epsilon!r} is invalid; it must be a finite number > 0")


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    history: Sequence[Release] = (),
) -> float:
    """Smallest noise multiplier (within the tolerance) such that ``history`` plus ``steps`` more steps at
    ``sample_rate`` stays at or below ``target_epsilon``: how much noise the remaining rounds need."""
    _check_target(target_epsilon)
    check_release((1.0, sample_rate, steps), where="planned release")
    if steps < 1:
        raise PrivacyError(f"steps={steps!r}: planning needs at least one step; zero steps need no noise")
    prior = list(history)
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the history alone already spends epsilon={spent:.4g} (delta={delta:g}, {accountant}), which reaches "
            f"the target epsilon={target_epsilon:g}; no noise multiplier allows {steps} more steps. "
            "Train nothing more, or raise the target"
        )

    def eps_at(sigma: float) -> float:
        return epsilon(prior + [(sigma, float(sample_rate), int(steps))], delta, accountant)

    low, high = 0.0, 1.0
    eps_high = eps_at(high)
    while eps_high > target_epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"target epsilon={target_epsilon:g} is unreachable: even noise_multiplier={high:g} gives "
                f"epsilon={eps_high:.4g} for {steps} steps at sample_rate={sample_rate:g} (delta={delta:g}, "
                f"{accountant}, epsilon spent before: {spent:.4g}). Raise the target, or plan fewer steps or a "
                "smaller sample rate"
            )
        low, high = high, min(2.0 * high, MAX_NOISE_MULTIPLIER)
        eps_high = eps_at(high)
    # The sigma-width guard ends the search even where the PRV estimate is not perfectly monotone in sigma.
    while target_epsilon - eps_high > EPSILON_TOLERANCE and high - low > 1e-6 * high:
        mid = (low + high) / 2.0
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high


def planned_steps(num_examples: int, batch_size: int, local_epochs: int, max_steps: int = 0) -> tuple[float, int]:
    """``(sample_rate, steps)`` of one round of local DP-SGD: q = batch_size / num_examples (at most 1) and
    local_epochs * ceil(1/q) steps, capped by ``max_steps`` when it is > 0."""
    for name, value, minimum in (
        ("num_examples", num_examples, 1),
        ("batch_size", batch_size, 1),
        ("local_epochs", local_epochs, 1),
        ("max_steps", max_steps, 0),
    ):
        if not _is_int(value) or value < minimum:
            raise PrivacyError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")
    if batch_size >= num_examples:
        return 1.0, _capped(local_epochs, max_steps)
    # Integer ceil: a float 1/q can land just above an integer (e.g. 1024/16) and add a phantom step.
    steps_per_epoch = -(-num_examples // batch_size)
    return batch_size / num_examples, _capped(local_epochs * steps_per_epoch, max_steps)


def _capped(steps: int, max_steps: int) -> int:
    return min(steps, max_steps) if max_steps > 0 else steps
