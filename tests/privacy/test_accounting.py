from __future__ import annotations

import math

import numpy as np
import pytest

from fedpeft.errors import PrivacyError
from fedpeft.privacy import skellam
from fedpeft.privacy.accounting import SkellamRelease, epsilon, history_epsilon
from tests.privacy.releases import DELTA, SK_L1, SK_L2, SK_MU, SK_Q, Q
from tests.privacy.releases import skellam_release as _skellam_release


def _opacus_epsilon(accountant: str, sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """Opacus' own accountant, fed step by step the way the PrivacyEngine feeds it."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    ("accountant", "sigma", "q", "steps", "known"),
    [
        ("rdp", 1.0, Q, 63, 1.46),  # stack-facts section 6
        ("rdp", 1.0, Q, 625, 2.76),
        ("rdp", 0.8, Q, 3125, 9.93),
        ("rdp", 2.0, 0.1, 100, None),
        ("prv", 1.0, Q, 63, 1.00),
        ("prv", 1.0, Q, 625, 2.44),
    ],
)
def test_epsilon_equals_opacus_accountant(accountant, sigma, q, steps, known):
    ours = epsilon([(sigma, q, steps)], DELTA, accountant)
    assert ours == pytest.approx(_opacus_epsilon(accountant, sigma, q, steps), rel=1e-9)
    if known is not None:
        assert ours == pytest.approx(known, abs=0.006)


def test_heterogeneous_history_equals_opacus_rdp():
    from opacus.accountants import RDPAccountant

    history = [(1.0, Q, 40), (1.5, 0.032, 30), (1.0, Q, 20)]
    reference = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon(history, DELTA, "rdp") == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-9)


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.0, Q, 63), (1.0, Q, 625), (0.8, Q, 3125), (1.5, Q, 625), (2.0, 0.1, 100), (0.5, 0.004, 2000)],
)
def test_rdp_matches_dp_accounting(sigma, q, steps):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    reference = RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    # Measured: within 0.13% on these settings (the two libraries use different RDP order grids). Far outside them,
    # e.g. sigma=5 at 63 steps, Opacus' default grid (orders up to 63) is the binding limit and is ~37% looser.
    assert epsilon([(sigma, q, steps)], DELTA, "rdp") == pytest.approx(reference.get_epsilon(DELTA), rel=0.005)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_split_history_composes_to_the_same_epsilon(accountant):
    split = epsilon([(1.0, Q, 300), (1.0, Q, 325)], DELTA, accountant)
    assert split == epsilon([(1.0, Q, 625)], DELTA, accountant)


def test_epsilon_grows_with_steps():
    rdp = [epsilon([(1.0, Q, steps)], DELTA, "rdp") for steps in (1, 10, 63, 300, 1000)]
    assert rdp == sorted(rdp) and len(set(rdp)) == len(rdp)
    prv = [epsilon([(1.0, Q, steps)], DELTA, "prv") for steps in (20, 200)]
    assert prv[0] < prv[1]


def test_zero_noise_is_infinite_and_nothing_released_is_zero():
    assert epsilon([(0.0, Q, 10)], DELTA) == math.inf
    assert epsilon([(1.0, Q, 10), (0.0, Q, 1)], DELTA, "rdp") == math.inf
    assert epsilon([], DELTA) == 0.0
    assert epsilon([(1.0, Q, 0), (0.0, Q, 0)], DELTA) == 0.0


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        (lambda: epsilon([(1.0, Q, 10)], 0.0), "delta=0.0"),
        (lambda: epsilon([(1.0, Q, 10)], 1.0), "delta=1.0"),
        (lambda: epsilon([(1.0, Q, 10)], float("nan")), "delta=nan"),
        (lambda: epsilon([(1.0, 0.0, 10)], DELTA), "sample_rate=0.0"),
        (lambda: epsilon([(1.0, 1.5, 10)], DELTA), "sample_rate=1.5"),
        (lambda: epsilon([(1.0, Q, -1)], DELTA), "steps=-1"),
        (lambda: epsilon([(1.0, Q, 2.5)], DELTA), "steps=2.5"),
        (lambda: epsilon([(-1.0, Q, 10)], DELTA), "noise_multiplier=-1.0"),
        (lambda: epsilon([(float("inf"), Q, 10)], DELTA), "noise_multiplier=inf"),
        (lambda: epsilon([(1.0, Q)], DELTA), "history[0]"),
        (lambda: epsilon([(1.0, Q, 10)], DELTA, "gdp"), "'gdp'"),
    ],
)
def test_invalid_inputs_name_the_value(call, shown):
    with pytest.raises(PrivacyError) as info:
        call()
    assert shown in str(info.value)


# ---- mixed histories: Gaussian (DP-SGD) and Skellam (distributed DP) releases ---------------------------------------

@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_history_epsilon_of_gaussian_releases_is_todays_epsilon(accountant):
    history = [(1.0, Q, 40), (1.5, 0.032, 30), (1.0, Q, 20)]
    assert history_epsilon(history, DELTA, accountant) == epsilon(history, DELTA, accountant)
    assert history_epsilon([], DELTA, accountant) == 0.0
    assert history_epsilon([(0.0, Q, 3)], DELTA, accountant) == math.inf
    # a Skellam release of zero steps releases nothing: still today's Gaussian epsilon
    assert history_epsilon([*history, _skellam_release(0)], DELTA, accountant) == epsilon(history, DELTA, accountant)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_history_epsilon_of_one_skellam_release_is_skellam_epsilon(accountant):
    expected = skellam.epsilon(q=SK_Q, mu=SK_MU, steps=40, l1=SK_L1, l2=SK_L2, delta=DELTA)
    assert history_epsilon([_skellam_release(40)], DELTA, accountant) == expected
    # split into rounds (one release per round, as the ledger records them) it composes to the same number
    assert history_epsilon([_skellam_release(1)] * 40, DELTA, accountant) == pytest.approx(expected, rel=1e-12)


def test_mixed_history_is_the_rdp_composition_summed_by_hand():
    from opacus.accountants.analysis.rdp import compute_rdp

    gaussian = [(1.0, Q, 63), (1.3, 0.032, 20)]
    history = [gaussian[0], _skellam_release(10), gaussian[1], _skellam_release(5, mu=2 * SK_MU)]
    orders = list(skellam.DEFAULT_ORDERS)
    by_hand = np.zeros(len(orders))
    for sigma, q, steps in gaussian:
        by_hand += compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    by_hand += skellam.rdp_curve(q=SK_Q, mu=SK_MU, l1=SK_L1, l2=SK_L2, steps=10, orders=orders)
    by_hand += skellam.rdp_curve(q=SK_Q, mu=2 * SK_MU, l1=SK_L1, l2=SK_L2, steps=5, orders=orders)
    # the same conversion as Opacus' RDP accountant (Balle et al. 2020), on the integer orders
    expected = float(np.min(by_hand + np.log1p(-1 / np.array(orders)) - (math.log(DELTA) + np.log(orders))
                            / (np.array(orders) - 1)))
    mixed = history_epsilon(history, DELTA, "rdp")
    assert mixed == pytest.approx(expected, rel=1e-12)
    assert history_epsilon(history, DELTA, "prv") == mixed  # a Skellam release: RDP whatever the setting
    # composition only adds: above each part alone (and above today's RDP epsilon of the Gaussian part)
    assert mixed > history_epsilon([_skellam_release(10), _skellam_release(5, mu=2 * SK_MU)], DELTA)
    assert mixed > epsilon(gaussian, DELTA, "rdp") > epsilon(gaussian, DELTA, "prv")
    assert history_epsilon([*history, (0.0, Q, 1)], DELTA, "rdp") == math.inf


@pytest.mark.parametrize(
    ("release", "shown"),
    [
        (SkellamRelease(0.0, SK_MU, SK_L1, SK_L2), "sample_rate=0.0"),
        (SkellamRelease(1.5, SK_MU, SK_L1, SK_L2), "sample_rate=1.5"),
        (SkellamRelease(SK_Q, 0.0, SK_L1, SK_L2), "mu=0.0"),
        (SkellamRelease(SK_Q, math.inf, SK_L1, SK_L2), "mu=inf"),
        (SkellamRelease(SK_Q, SK_MU, SK_L1, 0.0), "l2=0.0"),
        (SkellamRelease(SK_Q, SK_MU, 1.0, SK_L2), "l1=1.0"),
        (SkellamRelease(SK_Q, SK_MU, SK_L1, SK_L2, -1), "steps=-1"),
        (SkellamRelease(SK_Q, SK_MU, SK_L1, SK_L2, 1.5), "steps=1.5"),  # type: ignore[arg-type]
    ],
)
def test_invalid_skellam_releases_name_the_value(release, shown):
    with pytest.raises(PrivacyError, match="history\\[1\\]") as info:
        history_epsilon([(1.0, Q, 1), release], DELTA)
    assert shown in str(info.value)


def test_gaussian_only_functions_refuse_a_skellam_release_with_the_fix():
    with pytest.raises(PrivacyError, match="is a Skellam release.*history_epsilon"):
        epsilon([_skellam_release()], DELTA)
