"""Distributed DP in a real federation: one DP step per round across the sites, Skellam noise shares under secure
aggregation; the server code holds only packed masked uploads and the sum, and each site's ledger accounts the
round as a subsampled Skellam release with its cohort."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import fedpeft.secagg.server as secagg_server
import fedpeft.server.distributed as server_distributed
from fedpeft.composition import from_mapping
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.site_budget import site_ledger_path
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow


def _config(tmp_path, name: str, **privacy):
    return from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "peft": {"method": "probe"},
        "federation": {"rounds": 4, "num_sites": 3, "secure_aggregation": True, "aggregation": "server-sgd",
                       "eval_every": 2},
        "data": {"synthetic_examples": 240},
        "secagg": {"max_weight": 100},
        "privacy": {"dp": True, "dp_mode": "distributed", "target_epsilon": 8.0, **privacy},
        "run": {"name": name, "out_dir": str(tmp_path)},
    })


def test_a_distributed_dp_federation_releases_only_the_noisy_sum_and_accounts_each_round(tmp_path, monkeypatch):
    uploads, sums = [], []
    original_vector, original_collect = secagg_server.masked_vector, server_distributed.collect

    def recording_vector(reply):
        uploads.append(original_vector(reply))
        return uploads[-1]

    def recording_collect(secure, template, plan, **kwargs):
        sums.append((secure.ring.copy(), plan))
        return original_collect(secure, template, plan, **kwargs)

    monkeypatch.setattr(secagg_server, "masked_vector", recording_vector)
    monkeypatch.setattr(server_distributed, "collect", recording_collect)
    cfg = _config(tmp_path, "ddp")
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["aggregated"] for r in rounds[1:]] == [True] * 4
    assert [r["evaluated"] for r in rounds] == [True, False, True, False, True]
    assert len(uploads) == 12 and all(u.dtype == np.uint8 for u in uploads), "packed masked uploads only"
    plan = sums[0][1]
    assert plan.bits < 32 and uploads[0].nbytes == -(-(plan.dim + 1) * plan.bits // 8)  # bits per value, packed
    epsilons = [r["site_epsilon"] for r in rounds[1:]]
    for site in ("0", "1", "2"):
        spent = [e[site] for e in epsilons]
        assert spent == sorted(spent) and 0 < spent[-1] <= 8.0 + 1e-6
        entries = PrivacyLedger(site_ledger_path(cfg, site)).entries
        assert [e.mechanism for e in entries] == ["skellam"] * 4
        # each site plans its own variance from its ledger (to the accountant's 0.5 % tolerance of the round's);
        # its share is at least mu / m, so the sum carries at least what the ledger accounts
        assert all(e.cohort == plan.cohort and abs(e.mu / plan.mu - 1) < 0.01 for e in entries)
    adapters = sorted(a.name for a in (result.run_dir / "adapters").glob("round-*"))
    assert adapters == ["round-0001", "round-0002", "round-0003", "round-0004"]

    # the same sites (their ledgers belong to them, not to the run) asked for a longer run: their budget is spent,
    # each refuses rather than adding unbounded noise to the sum, and the run stops instead of refusing 40 rounds
    again = simulate(replace(cfg, run=replace(cfg.run, name="again"),
                             federation=replace(cfg.federation, rounds=40)))
    lines = [json.loads(line) for line in (again.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1] and not lines[1]["aggregated"]
    assert again.summary["unchanged_reason"] and all(
        "privacy budget" in r or "times the noise" in r for r in lines[1]["refusals"].values())


def test_a_site_refuses_when_the_cohort_is_below_its_minimum(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nmax_epsilon = 8.0\nmin_cohort = 3\nallowed_peft_methods = [\"probe\"]\n")
    cfg = _config(tmp_path, "cohort", policy_file=str(policy))  # 3 sites: the threshold (cohort) is 2
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert all(not r["aggregated"] for r in rounds[1:])
    assert all(len(r["refusals"]) == 3 and all("min_cohort" in reason or "cohort" in reason
                                               for reason in r["refusals"].values()) for r in rounds[1:])


def test_a_mixed_federation_runs_and_a_site_that_accepts_no_shares_adds_the_whole_noise(tmp_path):
    for site, accepts in (("0", "false"), ("1", "true"), ("2", "true")):
        (tmp_path / f"policy-{site}.toml").write_text(
            f"[policy]\nmax_epsilon = 8.0\nallowed_peft_methods = [\"probe\"]\naccept_distributed_noise = {accepts}\n")
    cfg = _config(tmp_path, "mixed", policy_file=str(tmp_path / "policy-{site}.toml"))
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["aggregated"] for r in rounds[1:]] == [True] * 4
    shares = {}
    for site in ("0", "1", "2"):
        log = site_ledger_path(cfg, site).parent / "audit.jsonl"
        releases = [json.loads(line)["data"] for line in log.read_text().splitlines()
                    if json.loads(line)["kind"] == "release"]
        shares[site] = [r["noise_share"] for r in releases]
        ledger = PrivacyLedger(site_ledger_path(cfg, site)).entries
        assert [e.mechanism for e in ledger] == ["skellam"] * 4 and ledger[-1].epsilon == pytest.approx(8.0, abs=0.01)
        mus = [e.mu for e in ledger]
        if site == "0":  # its whole planned noise: its guarantee rests on no other site
            assert shares[site] == pytest.approx(mus)
        else:
            assert shares[site] == pytest.approx([mu / ledger[0].cohort for mu in mus], rel=0.01)
