"""The planning side of the privacy facade: the noise for a target epsilon and the steps a round will take."""

from __future__ import annotations

import pytest

from fedpeft.errors import PrivacyError
from fedpeft.privacy import skellam
from fedpeft.privacy.accounting import epsilon, history_epsilon
from fedpeft.privacy.planning import noise_multiplier_for, planned_steps, skellam_mu_for
from tests.privacy.releases import DELTA, SK_L1, SK_L2, SK_Q, Q
from tests.privacy.releases import skellam_release as _skellam_release


def test_noise_multiplier_round_trips_rdp():
    from opacus.accountants.utils import get_noise_multiplier

    sigma = noise_multiplier_for(8.0, DELTA, Q, 625, accountant="rdp")
    eps = epsilon([(sigma, Q, 625)], DELTA, "rdp")
    assert 8.0 - 0.05 <= eps <= 8.0
    opacus_sigma = get_noise_multiplier(
        target_epsilon=8.0, target_delta=DELTA, sample_rate=Q, steps=625, accountant="rdp"
    )
    assert sigma == pytest.approx(opacus_sigma, abs=0.01)  # stack-facts: 0.663


def test_noise_multiplier_round_trips_prv():
    sigma = noise_multiplier_for(3.0, DELTA, Q, 63, accountant="prv")
    eps = epsilon([(sigma, Q, 63)], DELTA, "prv")
    assert 3.0 - 0.05 <= eps <= 3.0


def test_noise_multiplier_composes_with_history():
    history = [(1.0, Q, 300)]
    alone = noise_multiplier_for(4.0, DELTA, Q, 300, accountant="rdp")
    after = noise_multiplier_for(4.0, DELTA, Q, 300, accountant="rdp", history=history)
    assert after > alone
    eps = epsilon(history + [(after, Q, 300)], DELTA, "rdp")
    assert 4.0 - 0.05 <= eps <= 4.0


def test_noise_multiplier_refuses_spent_or_unreachable_budgets():
    spent = epsilon([(1.0, Q, 625)], DELTA, "rdp")
    with pytest.raises(PrivacyError, match=r"already spends epsilon=2\.7"):
        noise_multiplier_for(2.0, DELTA, Q, 63, accountant="rdp", history=[(1.0, Q, 625)])
    assert spent > 2.0
    # Opacus' RDP order grid bounds epsilon below at ~0.1 for any noise: a smaller target is unreachable.
    with pytest.raises(PrivacyError, match=r"unreachable.*noise_multiplier=10000"):
        noise_multiplier_for(0.05, DELTA, Q, 625, accountant="rdp")


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        (lambda: noise_multiplier_for(0.0, DELTA, Q, 10), "target_epsilon=0.0"),
        (lambda: noise_multiplier_for(1.0, DELTA, Q, 0), "steps=0"),
        (lambda: planned_steps(0, 16, 1), "num_examples=0"),
        (lambda: planned_steps(100, 0, 1), "batch_size=0"),
        (lambda: planned_steps(100, 16, 0), "local_epochs=0"),
        (lambda: planned_steps(100, 16, 1, max_steps=-1), "max_steps=-1"),
    ],
)
def test_invalid_planning_inputs_name_the_value(call, shown):
    with pytest.raises(PrivacyError) as info:
        call()
    assert shown in str(info.value)


def test_planned_steps():
    assert planned_steps(1000, 16, 1) == (0.016, 63)
    assert planned_steps(1000, 16, 2) == (0.016, 126)
    assert planned_steps(1000, 16, 2, max_steps=100) == (0.016, 100)
    assert planned_steps(1024, 16, 1) == (16 / 1024, 64)
    assert planned_steps(10, 16, 3) == (1.0, 3)


def test_skellam_mu_for_composes_with_history_and_meets_the_target():
    history = [(1.0, Q, 63), _skellam_release(3)]
    alone = skellam_mu_for(4.0, DELTA, sample_rate=SK_Q, l1=SK_L1, l2=SK_L2, steps=20)
    after = skellam_mu_for(4.0, DELTA, sample_rate=SK_Q, l1=SK_L1, l2=SK_L2, steps=20, history=history)
    assert after > alone
    for prior, mu in (([], alone), (history, after)):
        eps = history_epsilon([*prior, _skellam_release(20, mu=mu)], DELTA, "prv")
        assert 4.0 * 0.98 <= eps <= 4.0  # at most the target, and not wastefully far below it
        assert history_epsilon([*prior, _skellam_release(20, mu=mu * 0.99)], DELTA) > 4.0  # within 1%
    # without a history it is skellam.mu_for (same bisection, same accounting)
    direct = skellam.mu_for(target_epsilon=4.0, q=SK_Q, steps=20, l1=SK_L1, l2=SK_L2, delta=DELTA)
    assert alone == pytest.approx(direct, rel=skellam.MU_RELATIVE_TOLERANCE)


def test_skellam_mu_for_refuses_spent_or_unreachable_budgets():
    with pytest.raises(PrivacyError, match=r"already spends epsilon=2\.4.*prv"):
        skellam_mu_for(2.0, DELTA, sample_rate=SK_Q, l1=SK_L1, l2=SK_L2, steps=5, history=[(1.0, Q, 625)])
    # PRV says 2.44 of 2.6 is spent, but with a Skellam release the whole history is accounted by RDP, which
    # already gives the Gaussian part alone 2.76: no Skellam noise fits
    with pytest.raises(PrivacyError, match="unreachable.*accounted by RDP"):
        skellam_mu_for(2.6, DELTA, sample_rate=SK_Q, l1=SK_L1, l2=SK_L2, steps=5, history=[(1.0, Q, 625)])
    with pytest.raises(PrivacyError, match="unreachable"):
        skellam_mu_for(0.001, DELTA, sample_rate=SK_Q, l1=SK_L1, l2=SK_L2, steps=5)  # below the floor 0.0035
    with pytest.raises(PrivacyError, match="steps=0"):
        skellam_mu_for(1.0, DELTA, sample_rate=SK_Q, l1=SK_L1, l2=SK_L2, steps=0)


def test_noise_multiplier_for_after_a_skellam_release_accounts_by_rdp():
    history = [_skellam_release(10)]
    sigma = noise_multiplier_for(5.0, DELTA, Q, 300, accountant="prv", history=history)
    eps = history_epsilon([*history, (sigma, Q, 300)], DELTA, "prv")
    assert 5.0 - 0.05 <= eps <= 5.0
    # RDP over the whole history is looser than PRV on the Gaussian part alone: more noise is needed
    assert sigma > noise_multiplier_for(5.0, DELTA, Q, 300, accountant="prv")


