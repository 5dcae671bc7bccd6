"""A site's budget for distributed-DP rounds: one Poisson-subsampled Skellam release per round, planned before
anything leaves the site, recorded after, and never re-spent or forgotten across a restart."""

from __future__ import annotations

import json
import math

import pytest

from fedpeft.composition import from_mapping
from fedpeft.errors import PrivacyBudgetExceeded, PrivacyError
from fedpeft.privacy.accounting import SkellamRelease, history_epsilon
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.planning import skellam_mu_for
from fedpeft.privacy.policy import SitePolicy
from fedpeft.privacy.site_budget import DistributedRoundPlan, SiteBudget

DELTA = 1e-5
Q, L2, SCALE, COHORT = 0.02, 120.0, 30.0, 3
L1 = 10 * L2
ROUND = dict(sample_rate=Q, l1=L1, l2=L2, scale=SCALE, cohort=COHORT)


def _config(tmp_path, *, rounds: int = 3, target: float = 2.0, accountant: str = "rdp"):
    return from_mapping({
        "federation": {"rounds": rounds},
        "privacy": {"dp": True, "target_epsilon": target, "delta": DELTA, "accountant": accountant},
        "run": {"name": "dist", "out_dir": str(tmp_path / "runs")},
    })


def _budget(tmp_path, policy: SitePolicy | None = None, **cfg) -> SiteBudget:
    return SiteBudget(_config(tmp_path, **cfg), "0", policy, tmp_path / "site-0" / "ledger.jsonl")


def test_derived_noise_spends_the_budget_over_the_remaining_rounds(tmp_path):
    budget = _budget(tmp_path)
    first = budget.plan_distributed(1, **ROUND)
    assert isinstance(first, DistributedRoundPlan)
    assert first.mu == skellam_mu_for(2.0, DELTA, sample_rate=Q, l1=L1, l2=L2, steps=3, accountant="rdp")
    assert first.noise_share == first.mu / COHORT and first.noise_multiplier == math.sqrt(first.mu) / L2
    assert not budget.ledger.path.exists()  # planning writes nothing
    spent = []
    for round_ in (1, 2, 3):
        plan = first if round_ == 1 else budget.plan_distributed(round_, **ROUND)
        spent.append(budget.commit_distributed(round_, plan))
        assert spent[-1] == plan.predicted_epsilon == budget.ledger.epsilon_spent()
    assert spent == sorted(spent) and 2.0 * 0.97 <= spent[-1] <= 2.0  # the whole budget, not more
    assert spent[-1] == history_epsilon(budget.ledger.history(), DELTA, "rdp")

    entry = budget.ledger.entries[0]
    assert (entry.mechanism, entry.kind, entry.cohort, entry.scale, entry.steps) == ("skellam", "example", 3, 30.0, 1)
    assert (entry.mu, entry.l1, entry.l2, entry.sample_rate) == (first.mu, L1, L2, Q)
    assert entry.noise_multiplier == pytest.approx(math.sqrt(first.mu) / L2) and entry.run == "dist"
    assert json.loads(budget.ledger.path.read_text().splitlines()[0])["schema_version"] == 2
    assert budget.ledger.history()[0] == SkellamRelease(Q, first.mu, L1, L2, 1)


def test_a_restarted_site_neither_respends_nor_forgets(tmp_path):
    budget = _budget(tmp_path, rounds=4)
    budget.commit_distributed(1, budget.plan_distributed(1, **ROUND))
    spent = budget.commit_distributed(2, budget.plan_distributed(2, **ROUND))

    restarted = _budget(tmp_path, rounds=4)  # a fresh process on the same ledger file
    assert restarted.ledger.epsilon_spent() == spent
    assert restarted.ledger.history() == budget.ledger.history()
    before = restarted.ledger.path.read_bytes()
    for same in (budget, restarted):
        with pytest.raises(PrivacyError, match="round 2 of run 'dist' is already in the privacy ledger"):
            same.plan_distributed(2, **ROUND)
    plan = restarted.plan_distributed(3, **ROUND)
    expected = history_epsilon([*budget.ledger.history(), plan.release()], DELTA, "rdp")
    assert plan.predicted_epsilon == expected > spent  # composed with what the first process spent
    assert restarted.ledger.path.read_bytes() == before


def test_over_budget_is_refused_before_anything_is_written(tmp_path):
    budget = _budget(tmp_path, target=1.0)
    with pytest.raises(PrivacyBudgetExceeded, match=r"over the site's budget max_epsilon=1\b"):
        budget.plan_distributed(1, **ROUND, mu=(0.3 * L2) ** 2)  # far too little noise for epsilon 1
    assert not budget.ledger.path.exists()

    budget.commit_distributed(1, budget.plan_distributed(1, **ROUND))
    spent_all = _budget(tmp_path, target=budget.ledger.epsilon_spent())  # a budget that is now used up
    before = spent_all.ledger.path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="has spent epsilon .* the site's whole budget"):
        spent_all.plan_distributed(2, **ROUND)
    with pytest.raises(PrivacyBudgetExceeded):
        spent_all.plan_distributed(2, **ROUND, mu=1e12)
    assert spent_all.ledger.path.read_bytes() == before


def test_the_site_policy_lowers_the_budget_and_raises_the_noise(tmp_path):
    budget = _budget(tmp_path, policy=SitePolicy(max_epsilon=1.0))
    assert budget.budget == 1.0
    derived = budget.plan_distributed(1, **ROUND)  # derived for a budget of 1.0, not the run's 2.0
    assert derived.mu == skellam_mu_for(1.0, DELTA, sample_rate=Q, l1=L1, l2=L2, steps=3, accountant="rdp")
    assert derived.predicted_epsilon <= 1.0

    noisy = _budget(tmp_path, policy=SitePolicy(max_epsilon=1.0, min_noise_multiplier=12.0))
    for plan in (noisy.plan_distributed(1, **ROUND, mu=(1.0 * L2) ** 2), noisy.plan_distributed(1, **ROUND)):
        # raised to the policy's Gaussian-equivalent minimum, sqrt(mu) / l2 >= 12, whether given or derived
        assert plan.mu == pytest.approx((12.0 * L2) ** 2) and plan.mu > derived.mu
        assert plan.noise_multiplier == pytest.approx(12.0)


def test_gaussian_and_distributed_rounds_share_one_ledger_and_one_budget(tmp_path):
    budget = _budget(tmp_path, rounds=4, target=3.0, accountant="prv")
    local = budget.plan(1, 0.016, 63)  # a DP-SGD round (PRV: the history is Gaussian only)
    gaussian_spent = budget.commit(1, local, 63)
    assert gaussian_spent == history_epsilon([(local.noise_multiplier, 0.016, 63)], DELTA, "prv")

    plan = budget.plan_distributed(2, **ROUND)  # now the whole history is accounted by RDP
    spent = budget.commit_distributed(2, plan)
    history = budget.ledger.history()
    assert spent == max(history_epsilon(history, DELTA, "prv"), gaussian_spent) <= 3.0
    assert history_epsilon(history, DELTA, "prv") == history_epsilon(history, DELTA, "rdp")
    assert [e.mechanism for e in PrivacyLedger(budget.ledger.path).entries] == ["gaussian", "skellam"]


def test_a_prv_spent_budget_can_leave_no_room_for_a_skellam_round(tmp_path):
    """The documented price of accounting a Skellam release by RDP: PRV's epsilon of the Gaussian rounds no longer
    counts, their (looser) RDP epsilon does, and when that alone reaches the budget the round is refused."""
    budget = _budget(tmp_path, rounds=2, target=3.0, accountant="prv")
    budget.commit(1, budget.plan(1, 0.016, 63), 63)  # spends about 2.5 of 3 by PRV, over 3 by RDP
    before = budget.ledger.path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="unreachable.*accounted by RDP"):
        budget.plan_distributed(2, **ROUND)
    assert budget.ledger.path.read_bytes() == before


@pytest.mark.parametrize(
    ("changes", "shown"),
    [({"cohort": 0}, "cohort=0"), ({"scale": 0.0}, "scale=0.0"), ({"l1": 1.0}, "l1=1.0"), ({"mu": 0.0}, "mu=0.0"),
     ({"sample_rate": 0.0}, "sample_rate=0.0")],
)
def test_invalid_round_parameters_are_refused(tmp_path, changes, shown):
    budget = _budget(tmp_path)
    with pytest.raises(PrivacyError) as info:
        budget.plan_distributed(1, **{**ROUND, **changes})
    assert shown in str(info.value) and not isinstance(info.value, PrivacyBudgetExceeded)

