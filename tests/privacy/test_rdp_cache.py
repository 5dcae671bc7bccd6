"""The cached accountants are Opacus' accountants: the same epsilon, float for float, on histories of one and of
several settings; a cached curve cannot be changed by a caller."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from fedpeft.privacy.rdp_cache import CachedPRVAccountant, CachedRDPAccountant, gaussian_rdp, rdp_per_step

HISTORIES = [
    [(1.0, 1 / 3, 12)],
    [(0.6, 0.05, 40)],
    [(0.5867, 0.01, 1000)],
    [(1.0, 1.0, 3)],  # full batches: Opacus' closed form
    [(0.9, 0.2, 10), (1.3, 0.2, 5), (0.9, 0.2, 7)],  # rounds of different noise, one setting twice
    [(2.0, 0.004, 500), (0.7, 0.3, 2)],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_the_cached_accountants_give_opacus_epsilon_exactly(history, delta):
    for ours, theirs in ((CachedPRVAccountant(), PRVAccountant()), (CachedRDPAccountant(), RDPAccountant())):
        ours.history, theirs.history = list(history), list(history)
        # twice: the second answer comes from the cache and must not differ either
        assert ours.get_epsilon(delta=delta) == theirs.get_epsilon(delta=delta)
        assert ours.get_epsilon(delta=delta) == theirs.get_epsilon(delta=delta)


def test_a_curve_is_opacus_compute_rdp_and_read_only():
    orders = RDPAccountant.DEFAULT_ALPHAS
    expected = compute_rdp(q=0.1, noise_multiplier=0.8, steps=7, orders=orders)
    assert np.array_equal(gaussian_rdp(sample_rate=0.1, noise_multiplier=0.8, steps=7, orders=orders), expected)
    curve = rdp_per_step(0.1, 0.8, tuple(orders))
    with pytest.raises(ValueError, match="read-only"):
        curve[0] = 0.0
    assert rdp_per_step(0.1, 0.8, tuple(orders)) is curve


def test_an_empty_history_spends_nothing():
    assert CachedRDPAccountant().get_privacy_spent(delta=1e-5) == (0, 0)
