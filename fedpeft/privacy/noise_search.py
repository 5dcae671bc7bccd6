"""The smallest noise that keeps a plan within its budget: a root search on a decreasing epsilon(noise) curve.

Each evaluation is a PRV epsilon (a discretized convolution, tenths of a second), so the search counts them. Plain
bisection from ``[0, 1]`` took 12-14 to land within ``EPSILON_TOLERANCE`` of the target. Epsilon is smooth and close
to a power law in the noise multiplier (``log eps`` nearly linear in ``log sigma``), so a secant step in log-log
coordinates aimed at the middle of the accepted window ``[target - tolerance, target]`` lands in it in 3-6. It is
safeguarded as Illinois-style regula falsi is: it always keeps a bracket (``eps(low) > target >= eps(high)``), never
steps outside it, and bisects whenever an interpolated step fails to shrink the bracket by half, so it ends where
bisection would, only sooner. The PRV estimate need not be perfectly monotone in sigma; the sigma-width guard ends
the search there too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_NOISE_MULTIPLIER = 1e4
EPSILON_TOLERANCE = 0.01  # as opacus.accountants.utils.get_noise_multiplier
RELATIVE_WIDTH = 1e-6  # the bracket is narrower than this fraction of sigma: nothing finer can matter


def smallest_noise(eps_at: Callable[[float], float], target: float, *,
                   tolerance: float = EPSILON_TOLERANCE) -> tuple[float, float]:
    """``(sigma, eps_at(sigma))`` with ``target - tolerance <= eps_at(sigma) <= target`` (or, where the curve is
    that steep, sigma within ``RELATIVE_WIDTH`` of the smallest that meets the target); ``eps_at`` decreases in
    sigma. An epsilon above ``target`` says the target is unreachable: that is ``MAX_NOISE_MULTIPLIER``'s."""
    low, eps_low = 0.0, math.inf
    high, eps_high = 1.0, eps_at(1.0)
    while eps_high > target:
        if high >= MAX_NOISE_MULTIPLIER:
            return high, eps_high
        low, eps_low = high, eps_high
        high = min(2.0 * high, MAX_NOISE_MULTIPLIER)
        eps_high = eps_at(high)
    aim, previous_width = target - tolerance / 2.0, math.inf
    while target - eps_high > tolerance and high - low > RELATIVE_WIDTH * high:
        candidate = _log_secant(low, eps_low, high, eps_high, aim=aim)
        if candidate is None or high - low > previous_width / 2.0:  # no usable line, or the last step did not halve
            candidate = (low + high) / 2.0
        previous_width = high - low
        eps = eps_at(candidate)
        if eps <= target:
            high, eps_high = candidate, eps
        else:
            low, eps_low = candidate, eps
    return high, eps_high


def _log_secant(low: float, eps_low: float, high: float, eps_high: float, *, aim: float) -> float | None:
    """Where the line through ``(log sigma, log eps)`` at both ends meets ``log aim``, kept strictly inside the
    bracket; None when an end gives no finite positive epsilon (sigma 0, or an epsilon of 0) to draw it through."""
    if not (low > 0.0 and 0.0 < eps_high < eps_low < math.inf and aim > 0.0):
        return None
    slope = (math.log(eps_high) - math.log(eps_low)) / (math.log(high) - math.log(low))
    if slope >= 0.0:
        return None
    sigma = math.exp(math.log(high) + (math.log(aim) - math.log(eps_high)) / slope)
    margin = 0.01 * (high - low)  # strictly inside: each evaluation must shrink the bracket
    return min(max(sigma, low + margin), high - margin)
