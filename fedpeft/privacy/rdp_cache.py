"""Opacus' PRV and RDP accountants, each sampled-Gaussian RDP curve computed once per process.

Why: planning a round's noise bisects on the noise multiplier, one PRV epsilon per candidate (12-14 of them), and
95 % of each PRV epsilon is ``compute_safe_domain_size`` -- two RDP epsilons over Opacus' 151 orders, 99 of them
fractional, each a Python series (``_compute_log_a_for_frac_alpha``). The two RDP epsilons ask for the same
``(sample_rate, noise_multiplier)`` curve (one is the whole history, the other a single step of it), and every
candidate recomputes the curves of the prior rounds' releases, which never change. Measured on a 2-core CPU: 8.7 s
to plan one round of 6 steps at rate 1/3 after one such round, per site per round.

The curves are Opacus' own numbers: ``rdp_per_step`` is ``compute_rdp(steps=1)``'s array (``_compute_rdp`` at each
order), and ``curve * steps`` is what ``compute_rdp(steps=steps)`` returns, float for float. ``CachedRDPAccountant``
and ``CachedPRVAccountant`` change nothing but where the curves come from, so they give Opacus' epsilon bit for bit;
``tests/privacy/test_rdp_cache.py`` checks that against Opacus' classes on a grid of histories, so an Opacus
release that changes its algorithm fails there rather than drifting silently.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

CURVES_KEPT = 4096  # (sample_rate, noise_multiplier, orders) triples: 151 floats each, about 5 MB in all


@functools.lru_cache(maxsize=CURVES_KEPT)
def rdp_per_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one sampled-Gaussian step at each of ``orders`` (read-only: the cache hands out the same array)."""
    curve = np.array([rdp_analysis._compute_rdp(sample_rate, noise_multiplier, order) for order in orders])
    curve.setflags(write=False)
    return curve


def gaussian_rdp(*, sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """``opacus...rdp.compute_rdp`` for a list of orders, from the cache."""
    return rdp_per_step(sample_rate, noise_multiplier, tuple(orders)) * steps


class CachedRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant; ``get_privacy_spent`` sums the cached curves in the history's order, as Opacus does."""

    def get_privacy_spent(self, *, delta: float, alphas: Any = None) -> tuple[float, float]:
        if not self.history:
            return 0, 0
        orders = self.DEFAULT_ALPHAS if alphas is None else alphas
        rdp = sum([gaussian_rdp(sample_rate=q, noise_multiplier=sigma, steps=steps, orders=orders)
                   for (sigma, q, steps) in self.history])
        eps, best_alpha = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps), float(best_alpha)


class CachedPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant whose discretization domain is sized from the cached curves."""

    def _get_domain(self, prvs: Any, num_self_compositions: Any, eps_error: float, delta_error: float) -> Any:
        total_self_compositions = sum(num_self_compositions)
        size = safe_domain_size(prvs, num_self_compositions, eps_error=eps_error, delta_error=delta_error)
        mesh_size = eps_error / np.sqrt(total_self_compositions * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


def safe_domain_size(prvs: Any, max_self_compositions: Sequence[int], *, eps_error: float,
                     delta_error: float) -> float:
    """``opacus.accountants.analysis.prv.domain.compute_safe_domain_size`` line for line (remark 5.6 of Gopi et
    al. 2021, as Opacus adapts it), with ``CachedRDPAccountant`` in place of ``RDPAccountant``."""
    total_compositions = sum(max_self_compositions)
    accountant = CachedRDPAccountant()
    for prv, compositions in zip(prvs, max_self_compositions, strict=True):
        accountant.history.append((prv.noise_multiplier, prv.sample_rate, compositions))
    size = accountant.get_epsilon(delta_error / 4)
    for prv in prvs:
        single = CachedRDPAccountant()
        single.history = [(prv.noise_multiplier, prv.sample_rate, 1)]
        size = max(size, single.get_epsilon(delta=delta_error / (8 * total_compositions)))
    return max(size, eps_error) + 3
