"""A federation with DP-SGD at every site: epsilon is reported per site, a site whose own policy budget runs out
refuses and trains nothing while the others carry on, and a restart does not give the budget back."""

from __future__ import annotations

import json
import math

import pytest

from fedpeft.composition import from_mapping
from fedpeft.errors import LedgerCorrupted, PrivacyBudgetExceeded
from fedpeft.privacy.accounting import epsilon
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.planning import planned_steps
from fedpeft.privacy.site_budget import SiteBudget, site_ledger_path, site_policy
from fedpeft.runs.run_dir import METRICS_FILE, SUMMARY_FILE
from fedpeft.simulations.engine import check_sites, simulate

pytestmark = pytest.mark.slow


def _config(tmp_path, **privacy):
    return from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "train": {"batch_size": 16, "learning_rate": 5e-3},
        "federation": {"rounds": 3, "num_sites": 3},
        "data": {"synthetic_examples": 240},
        "privacy": {"dp": True, "noise_multiplier": 1.0, "target_epsilon": 50.0, **privacy},
        "run": {"name": "dp", "out_dir": str(tmp_path / "runs")},
    })


def test_budget_exhaustion_stops_one_site_and_the_federation_carries_on(tmp_path):
    probe = _config(tmp_path)
    train_rows = len(check_sites(probe)[0].train)
    release = (1.0, *planned_steps(train_rows, 16, 1))
    one_round, two_rounds = (epsilon([release] * k, 1e-5, "prv") for k in (1, 2))
    (tmp_path / "site-0.toml").write_text(f"[policy]\nmax_epsilon = {(one_round + two_rounds) / 2}\n")
    cfg = _config(tmp_path, policy_file=str(tmp_path / "site-{site}.toml"), policy_optional=True)  # 1 and 2: none

    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert rounds[1]["site_epsilon"]["0"] == pytest.approx(one_round, rel=1e-3)
    for later in rounds[2:]:
        assert "0" in later["refusals"] and "budget" in later["refusals"]["0"]
        assert later["sites_returned"] == 2 and later["aggregated"]
        assert set(later["site_epsilon"]) == {"1", "2"}
    assert rounds[3]["site_epsilon"]["1"] > rounds[1]["site_epsilon"]["1"]
    summary = json.loads((result.run_dir / SUMMARY_FILE).read_text())
    assert set(summary["site_epsilon"]) == {"0", "1", "2"}
    assert all(math.isfinite(v) for v in summary["site_epsilon"].values())

    ledger = site_ledger_path(cfg, "0")
    assert [e.round for e in PrivacyLedger(ledger).entries] == [1]
    assert [e.round for e in PrivacyLedger(site_ledger_path(cfg, "1")).entries] == [1, 2, 3]
    restarted = SiteBudget(cfg, "0", site_policy(cfg, "0"), ledger)  # a fresh process reads the same ledger
    with pytest.raises(PrivacyBudgetExceeded):
        restarted.plan(4, release[1], release[2])

    # Lowering the spent epsilon of an early round (to win budget back) breaks the ledger's hash chain.
    other = site_ledger_path(cfg, "1")
    lines = other.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = lines[0].replace(json.dumps(first["epsilon"]), json.dumps(first["epsilon"] / 2))
    other.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerCorrupted):
        SiteBudget(cfg, "1", None, other)


def test_client_level_dp_with_noise_shares_reports_a_user_level_epsilon(tmp_path):
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        # Noise shares only under secure aggregation, of 3 or more sites per round (composition.distributed_rules).
        "federation": {"rounds": 2, "num_sites": 4, "min_sites": 3, "weighting": "uniform", "fraction_train": 0.75,
                       "secure_aggregation": True},
        "data": {"synthetic_examples": 240},
        "privacy": {"client_dp": "distributed", "client_clip": 0.5, "client_noise_multiplier": 1.0},
        "run": {"name": "cdp", "out_dir": str(tmp_path)},
    })
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["sites_sampled"] for r in rounds[1:]] == [3, 3]
    assert 0 < rounds[1]["client_dp_epsilon"] < rounds[2]["client_dp_epsilon"] < math.inf
    assert result.summary["client_dp_epsilon"] == rounds[2]["client_dp_epsilon"]
