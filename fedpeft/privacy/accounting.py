"""Epsilon of DP-SGD releases: a thin facade over Opacus' accountants (pure math, no state of its own).

A release is ``(noise_multiplier, sample_rate, steps)``, exactly one entry of an Opacus accountant's ``history``:
``steps`` Poisson-subsampled Gaussian steps at sampling rate ``sample_rate`` and noise ``noise_multiplier``.

Distributed DP (one DP-SGD step per round summed under secure aggregation, with integer Skellam noise shares) makes
a second kind, ``SkellamRelease``: ``steps`` Poisson-subsampled Skellam releases of total variance ``mu`` and integer
sensitivities ``l1``, ``l2`` (``fedpeft.privacy.skellam`` has the math). ``history_epsilon`` composes histories of
either or both kinds; ``epsilon`` stays the Gaussian-only facade over Opacus.

Each accountant is one small registered class (``register_accountant``), as aggregation rules are: the registry is
the one list of names, so ``privacy.accountant``'s choices, its error messages and the dispatch cannot drift apart.
How much noise a *planned* release needs is ``fedpeft.privacy.planning``'s question, answered from these epsilons.
"""

from __future__ import annotations

import functools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fedpeft.errors import PrivacyError
from fedpeft.registry import Registry

if TYPE_CHECKING:
    import numpy as np

Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SkellamRelease:
    """``steps`` Poisson-subsampled (rate ``sample_rate``) releases of an integer sum with Skellam noise of total
    variance ``mu``: one round of distributed DP-SGD as one site accounts it.

    ``mu``, ``l1`` and ``l2`` are in the scaled integer domain (units of ``1/scale``): ``l2`` and ``l1`` are the
    rounded per-example sensitivities (``skellam.rounded_l2_bound`` / ``rounded_l1_bound``), ``mu`` the variance of
    the noise in the decoded *sum* (each of the cohort's sites adds a share), not one site's share. Validated by
    ``check_skellam_release`` (``history_epsilon`` and the ledger call it), not on construction.
    """

    sample_rate: float
    mu: float
    l1: float
    l2: float
    steps: int = 1

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian-equivalent noise multiplier ``sqrt(mu) / l2``, for display: Skellam's RDP is this
        Gaussian's plus a discreteness surcharge, so it never accounts as this (see ``skellam.skellam_rdp``)."""
        return math.sqrt(self.mu) / self.l2 if self.l2 > 0 else math.inf


AnyRelease = Release | SkellamRelease


_ACCOUNTANTS: Registry[Accountant] = Registry("accountant", "privacy.accountant", PrivacyError)


class Accountant(ABC):
    """One way of composing DP-SGD releases into an epsilon: a wrapper around the Opacus accountant it builds.

    A fresh Opacus accountant per question keeps this module stateless: the ledger, not the accountant, holds the
    history, so the same releases always give the same epsilon.
    """

    name: ClassVar[str]
    trade_off: ClassVar[str]  # shown when a name is unknown, so the user can choose, e.g. "tighter"

    @abstractmethod
    def opacus_accountant(self) -> Any:
        """A new, empty Opacus accountant (imported lazily: Opacus pulls in torch, which config checks never need).

        ``fedpeft.privacy.rdp_cache``'s subclasses: Opacus' numbers, each RDP curve computed once per process."""

    def epsilon(self, releases: Sequence[Release], delta: float) -> float:
        """Epsilon at ``delta`` of already validated, merged releases, each with noise > 0.

        Remembered per process: a site asks the same question again when it commits the release it planned and
        each time it checks its ledger, and a simulation's actor asks it for every site of a round."""
        return _remembered_epsilon(type(self), tuple(releases), delta)


@functools.lru_cache(maxsize=1024)
def _remembered_epsilon(kind: type[Accountant], releases: tuple[Release, ...], delta: float) -> float:
    opacus_accountant = kind().opacus_accountant()
    opacus_accountant.history = list(releases)
    return float(opacus_accountant.get_epsilon(delta=delta))


def register_accountant(cls: type[Accountant]) -> type[Accountant]:
    return _ACCOUNTANTS.register(cls)


def registered_accountants() -> dict[str, type[Accountant]]:
    return _ACCOUNTANTS.all()


def build_accountant(name: str) -> Accountant:
    check_accountant(name)
    return _ACCOUNTANTS.get(name)()


@register_accountant
class PRV(Accountant):
    """Privacy random variables (Gopi et al. 2021): the tightest epsilon, so the least noise for a budget."""

    name = "prv"
    trade_off = "tighter"

    def opacus_accountant(self) -> Any:
        from fedpeft.privacy.rdp_cache import CachedPRVAccountant

        return CachedPRVAccountant()


@register_accountant
class RDP(Accountant):
    """Renyi DP (Mironov 2017): a looser epsilon, but cheap to compute for many distinct release settings."""

    name = "rdp"
    trade_off = "faster"

    def opacus_accountant(self) -> Any:
        from fedpeft.privacy.rdp_cache import CachedRDPAccountant

        return CachedRDPAccountant()


def check_accountant(accountant: str) -> None:
    known = _ACCOUNTANTS.all()
    if not isinstance(accountant, str) or accountant not in known:
        trade_offs = ", ".join(f"{name!r} is {cls.trade_off}" for name, cls in known.items())
        raise PrivacyError(
            f"accountant {accountant!r} is unknown; use one of {', '.join(known)} ({trade_offs})"
        )


def check_delta(delta: Any) -> None:
    if not is_real(delta) or not 0.0 < delta < 1.0:
        raise PrivacyError(
            f"delta={delta!r} is invalid: it must be a number strictly between 0 and 1 "
            "(customarily below 1/num_examples, e.g. 1e-5)"
        )


def check_release(release: Any, where: str = "release") -> Release:
    """Validate one ``(noise_multiplier, sample_rate, steps)`` and return it with plain Python types."""
    if isinstance(release, SkellamRelease):
        raise PrivacyError(
            f"{where}={release!r} is a Skellam release; Gaussian-only functions cannot account it. Compose mixed "
            "histories with history_epsilon"
        )
    if not isinstance(release, Sequence) or isinstance(release, str) or len(release) != 3:
        raise PrivacyError(f"{where}={release!r} is not a (noise_multiplier, sample_rate, steps) triple; pass one")
    sigma, q, steps = release
    if not is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise PrivacyError(
            f"{where}: noise_multiplier={sigma!r} is invalid; it must be a finite number >= 0 (0 means no noise)"
        )
    if not is_real(q) or not 0.0 < q <= 1.0:
        raise PrivacyError(
            f"{where}: sample_rate={q!r} is invalid; it must be in (0, 1] (batch_size / num_examples)"
        )
    if not is_int(steps) or steps < 0:
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


def check_skellam_release(release: Any, where: str = "release") -> SkellamRelease:
    """Validate one ``SkellamRelease`` and return it with plain Python types: ``sample_rate`` in (0, 1], finite
    ``mu > 0`` (a noise-free distributed release is not DP at all), finite ``l2 > 0``, finite ``l1 >= l2`` (every
    vector's L1 norm is at least its L2 norm, so a smaller ``l1`` is a wrong sensitivity), integer ``steps >= 0``."""
    if not isinstance(release, SkellamRelease):
        raise PrivacyError(f"{where}={release!r} is not a SkellamRelease(sample_rate, mu, l1, l2, steps)")
    q, mu, l1, l2, steps = release.sample_rate, release.mu, release.l1, release.l2, release.steps
    if not is_real(q) or not 0.0 < q <= 1.0:
        raise PrivacyError(f"{where}: sample_rate={q!r} is invalid; it must be in (0, 1] (each row's probability)")
    if not is_real(mu) or not math.isfinite(mu) or mu <= 0:
        raise PrivacyError(
            f"{where}: mu={mu!r} is invalid; the total Skellam variance must be a finite number > 0 (integer units)"
        )
    if not is_real(l2) or not math.isfinite(l2) or l2 <= 0:
        raise PrivacyError(f"{where}: l2={l2!r} is invalid; it must be a finite number > 0 (skellam.rounded_l2_bound)")
    if not is_real(l1) or not math.isfinite(l1) or l1 < l2:
        raise PrivacyError(
            f"{where}: l1={l1!r} is invalid; it must be a finite number >= l2={l2!r} (skellam.rounded_l1_bound)"
        )
    if not is_int(steps) or steps < 0:
        raise PrivacyError(f"{where}: steps={steps!r} is invalid; it must be an integer >= 0")
    return SkellamRelease(float(q), float(mu), float(l1), float(l2), int(steps))


def merged_mixed(history: Sequence[AnyRelease]) -> tuple[list[Release], list[SkellamRelease]]:
    """The Gaussian releases merged as ``_merged`` does, and the Skellam ones validated with steps > 0, steps summed
    per (sample_rate, mu, l1, l2): RDP is linear in the steps, so merging is exact here too."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise PrivacyError(f"history={history!r} is not a sequence of releases")
    gaussian: list[Release] = []
    skellam_steps: dict[tuple[float, float, float, float], int] = {}
    for index, release in enumerate(history):
        where = f"history[{index}]"
        if isinstance(release, SkellamRelease):
            r = check_skellam_release(release, where=where)
            if r.steps > 0:
                key = (r.sample_rate, r.mu, r.l1, r.l2)
                skellam_steps[key] = skellam_steps.get(key, 0) + r.steps
        else:
            gaussian.append(check_release(release, where=where))
    skellam_releases = [SkellamRelease(q, mu, l1, l2, steps) for (q, mu, l1, l2), steps in skellam_steps.items()]
    return _merged(gaussian), skellam_releases


def rdp_curve(gaussian: Sequence[Release], skellam_releases: Sequence[SkellamRelease]) -> np.ndarray:
    """Summed RDP at ``skellam.DEFAULT_ORDERS`` of merged, validated releases (Gaussian noise > 0)."""
    import numpy as np

    from fedpeft.privacy import skellam
    from fedpeft.privacy.rdp_cache import gaussian_rdp

    orders = list(skellam.DEFAULT_ORDERS)
    total = np.zeros(len(orders), dtype=np.float64)
    for sigma, q, steps in gaussian:
        total = total + np.asarray(gaussian_rdp(sample_rate=q, noise_multiplier=sigma, steps=steps, orders=orders),
                                   np.float64)
    for r in skellam_releases:
        total = total + skellam.rdp_curve(q=r.sample_rate, mu=r.mu, l1=r.l1, l2=r.l2, steps=r.steps, orders=orders)
    return total


def rdp_epsilon(curve: np.ndarray, delta: float) -> float:
    from fedpeft.privacy import skellam

    return skellam.rdp_to_epsilon(curve, skellam.DEFAULT_ORDERS, delta)


def history_epsilon(history: Sequence[AnyRelease], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of all releases in ``history``, Gaussian ``(noise_multiplier, sample_rate, steps)``
    tuples and ``SkellamRelease``s alike, composed; 0.0 when nothing was released.

    Without a Skellam release (of steps > 0) this is exactly ``epsilon(history, delta, accountant)``: PRV or RDP
    as configured. With one, the whole history is accounted by RDP *whatever* ``accountant`` says, because the
    PRV accountant here has no privacy-loss distribution for the Skellam mechanism: per integer order of
    ``skellam.DEFAULT_ORDERS``, Opacus' ``compute_rdp`` for each Gaussian release plus ``skellam.rdp_curve`` (the
    Zhu-Wang subsampling bound on Skellam's RDP) for each Skellam release, summed, then ``skellam.rdp_to_epsilon``
    (Balle et al. 2020). Every piece is an upper bound, so the result is an upper bound on the true epsilon; it can
    be looser than PRV would be for the same Gaussian releases (and than Opacus' RDP accountant, whose grid also has
    fractional orders), never tighter than the truth. ``accountant`` is still validated, and it still picks the
    Gaussian-only path.
    """
    build_accountant(accountant)
    check_delta(delta)
    gaussian, skellam_releases = merged_mixed(history)
    if not skellam_releases:
        return epsilon(gaussian, delta, accountant)
    if any(sigma == 0.0 for sigma, _, _ in gaussian):
        return math.inf
    return rdp_epsilon(rdp_curve(gaussian, skellam_releases), delta)


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
