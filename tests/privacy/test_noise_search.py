"""The noise search: lands in the accepted window, in few evaluations on epsilon's near power law, never returns
a noise whose epsilon is over the target, and says when the target is out of reach."""

from __future__ import annotations

import math

import pytest

from fedpeft.privacy.noise_search import EPSILON_TOLERANCE, MAX_NOISE_MULTIPLIER, smallest_noise


class Counted:
    def __init__(self, curve):
        self.curve, self.calls = curve, 0

    def __call__(self, sigma: float) -> float:
        self.calls += 1
        return self.curve(sigma)


@pytest.mark.parametrize("scale", [0.3, 1.0, 7.0, 400.0])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_a_power_law_lands_in_the_window_in_few_evaluations(scale, power):
    eps_at = Counted(lambda sigma: 8.0 * (scale / sigma) ** power if sigma > 0 else math.inf)
    sigma, eps = smallest_noise(eps_at, 8.0)
    assert eps == eps_at.curve(sigma)
    assert 8.0 - EPSILON_TOLERANCE <= eps <= 8.0
    assert eps_at.calls <= 14  # the doubling to bracket it, then 3-6: bisection alone took 12-14 from [0, 1]
    assert eps_at.calls - math.ceil(max(math.log2(scale), 0.0)) <= 7, eps_at.calls


def test_a_steep_curve_ends_on_the_width_guard_within_the_target():
    eps_at = Counted(lambda sigma: 100.0 if sigma < 2.5 else 1.0)  # no sigma gives an epsilon in [7.99, 8]
    sigma, eps = smallest_noise(eps_at, 8.0)
    assert eps == 1.0 and 2.5 <= sigma <= 2.5 * (1 + 2e-6)
    assert eps_at.calls < 60


def test_a_curve_that_is_not_monotone_still_never_returns_an_epsilon_over_the_target():
    def wobbly(sigma: float) -> float:
        return 8.0 / sigma + 0.02 * math.sin(40 * sigma) if sigma > 0 else math.inf

    sigma, eps = smallest_noise(wobbly, 4.0)
    assert eps <= 4.0 and eps == wobbly(sigma)


def test_an_unreachable_target_returns_the_largest_noise_and_its_epsilon_over_the_target():
    sigma, eps = smallest_noise(lambda sigma: 0.2 + 1.0 / sigma, 0.1)
    assert sigma == MAX_NOISE_MULTIPLIER and eps > 0.1
