"""A site's side of a distributed-DP round (fedpeft.client.distributed): what it refuses before releasing."""

from __future__ import annotations

import pytest

from fedpeft.client.distributed import MAX_NOISE_FACTOR, site_round
from fedpeft.errors import PrivacyBudgetExceeded
from fedpeft.privacy.distributed import DistributedPlan
from fedpeft.privacy.site_budget import SiteBudget
from tests.privacy.test_site_budget_distributed import COHORT, L1, L2, ROUND, SCALE, Q, _budget, _config


def test_a_nearly_spent_budget_refuses_instead_of_drowning_the_sum(tmp_path):
    budget = _budget(tmp_path, rounds=3)
    fresh = budget.plan_distributed(1, **ROUND)
    plan = DistributedPlan(Q, 1.0, SCALE, 10, COHORT, 16, L2, L1, mu=fresh.mu)
    mu, _ = site_round(budget=budget, server_round=1, plan=plan)  # a fresh site needs the round's noise: it joins
    assert mu == pytest.approx(fresh.mu)
    for round_ in (1, 2, 3):  # the whole budget (to within the accountant's tolerance)
        budget.commit_distributed(round_, budget.plan_distributed(round_, **ROUND))
    lines = budget.ledger.path.read_text()
    again = SiteBudget(_config(tmp_path, rounds=6), "0", None, budget.ledger.path)  # a longer run on the same site
    with pytest.raises(PrivacyBudgetExceeded, match="times the noise this round is planned for") as caught:
        site_round(budget=again, server_round=4, plan=plan)
    assert f"at most {MAX_NOISE_FACTOR:g}" in str(caught.value) and "ledger_dir" in str(caught.value)
    assert budget.ledger.path.read_text() == lines, "a refused round writes nothing"
