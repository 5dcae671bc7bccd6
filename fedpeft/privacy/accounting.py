"""Epsilon of DP-SGD releases: a thin facade over Opacus' accountants (pure math, no state of its own).

A release is ``(noise_multiplier, sample_rate, steps)``, exactly one entry of an Opacus accountant's ``history``:
``steps`` Poisson-subsampled Gaussian steps at sampling rate ``sample_rate`` and noise ``noise_multiplier``.

Each accountant is one small registered class (``register_accountant``), as aggregation rules are: the registry is
the one list of names, so ``privacy.accountant``'s choices, its error messages and the dispatch cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from fedpeft.errors import PrivacyError

Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
MAX_NOISE_MULTIPLIER = 1e4
EPSILON_TOLERANCE = 0.01  # as opacus.accountants.utils.get_noise_multiplier


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_ACCOUNTANTS: dict[str, type[Accountant]] = {}


class Accountant(ABC):
    """One way of composing DP-SGD releases into an epsilon: a wrapper around the Opacus accountant it builds.

    A fresh Opacus accountant per question keeps this module stateless: the ledger, not the accountant, holds the
    history, so the same releases always give the same epsilon.
    """

    name: ClassVar[str]
    trade_off: ClassVar[str]  # shown when a name is unknown, so the user can choose, e.g. "tighter"

    @abstractmethod
    def opacus_accountant(self) -> Any:
        """A new, empty Opacus accountant (imported lazily: Opacus pulls in torch, which config checks never need)."""

    def epsilon(self, releases: Sequence[Release], delta: float) -> float:
        """Epsilon at ``delta`` of already validated, merged releases, each with noise > 0."""
        opacus_accountant = self.opacus_accountant()
        opacus_accountant.history = list(releases)
        return float(opacus_accountant.get_epsilon(delta=delta))


def register_accountant(cls: type[Accountant]) -> type[Accountant]:
    if cls.name in _ACCOUNTANTS:
        raise ValueError(f"accountant '{cls.name}' is registered twice")
    _ACCOUNTANTS[cls.name] = cls
    return cls


def registered_accountants() -> dict[str, type[Accountant]]:
    return dict(_ACCOUNTANTS)


def build_accountant(name: str) -> Accountant:
    check_accountant(name)
    return _ACCOUNTANTS[name]()


@register_accountant
class PRV(Accountant):
    """Privacy random variables (Gopi et al. 2021): the tightest epsilon, so the least noise for a budget."""

    name = "prv"
    trade_off = "tighter"

    def opacus_accountant(self) -> Any:
        from opacus.accountants import PRVAccountant

        return PRVAccountant()


@register_accountant
class RDP(Accountant):
    """Renyi DP (Mironov 2017): a looser epsilon, but cheap to compute for many distinct release settings."""

    name = "rdp"
    trade_off = "faster"

    def opacus_accountant(self) -> Any:
        from opacus.accountants import RDPAccountant

        return RDPAccountant()


def check_accountant(accountant: str) -> None:
    if not isinstance(accountant, str) or accountant not in _ACCOUNTANTS:
        trade_offs = ", ".join(f"{name!r} is {cls.trade_off}" for name, cls in _ACCOUNTANTS.items())
        raise PrivacyError(
            f"accountant {accountant!r} is unknown; use one of {', '.join(_ACCOUNTANTS)} ({trade_offs})"
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


def epsilon(history: Sequence[Release], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of all releases in ``history`` composed; 0.0 when nothing was released."""
    composer = build_accountant(accountant)
    check_delta(delta)
    releases = _merged(history)
    if not releases:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in releases):
        return math.inf
    return composer.epsilon(releases, delta)


def _check_target(target_epsilon: Any) -> None:
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(f"target_epsilon={target_epsilon!r} is invalid; it must be a finite number > 0")


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
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
