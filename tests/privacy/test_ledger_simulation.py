"""Issue #18 §1 reproduced on a real Flower simulation: three sites' ledgers deleted, cut short and edited between
runs; on resume those sites refuse before training while the untouched site trains, and the ledgers the simulated
sites wrote are outside the run directory, where a run under another name finds them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fedpeft.audit.log import read_records
from fedpeft.audit.verify import verify_log
from fedpeft.composition import from_mapping
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.site_budget import LEDGER_RULE, site_ledger_path
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow


def _rounds(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_tampered_ledgers_refuse_on_resume_and_the_ledgers_outlive_the_run_name(tmp_path):
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "train": {"batch_size": 16},
        "federation": {"rounds": 2, "num_sites": 4, "min_sites": 1, "eval_every": 10},
        "data": {"synthetic_examples": 160, "partitioner": "iid"},
        "privacy": {"dp": True, "noise_multiplier": 1.0, "target_epsilon": 50.0},
        "run": {"name": "first", "out_dir": str(tmp_path / "runs")},
    })
    first = simulate(cfg)
    ledgers = {site: site_ledger_path(cfg, site) for site in "0123"}
    assert not any(first.run_dir in path.parents for path in ledgers.values()), "a ledger is the site's, not the run's"
    spent = {site: PrivacyLedger(path).epsilon_spent() for site, path in ledgers.items()}
    assert all(eps > 0 for eps in spent.values())

    ledgers["1"].unlink()  # deleted
    cut = ledgers["0"].read_text().splitlines()[:-1]  # the last line cut
    ledgers["0"].write_text("".join(line + "\n" for line in cut))
    lines = ledgers["2"].read_text().splitlines()  # the last line's noise multiplier raised
    last = json.loads(lines[-1])
    last["noise_multiplier"] = 3.0
    ledgers["2"].write_text("".join(line + "\n" for line in [*lines[:-1], json.dumps(last)]))
    tampered = {site: ledgers[site].read_bytes() for site in "02"}

    resumed = simulate(replace(cfg, federation=replace(cfg.federation, rounds=3)), resume=True)
    third = _rounds(resumed.run_dir)[-1]
    assert third["round"] == 3 and set(third["refusals"]) == {"0", "1", "2"}
    assert set(third["site_epsilon"]) == {"3"} and third["site_epsilon"]["3"] > spent["3"]
    for site, words in {"0": "shorter", "1": "is missing", "2": "was edited"}.items():
        reason = third["refusals"][site]
        assert words in reason and "Restore the ledger from a backup" in reason, reason
        own = [r for r in read_records(ledgers[site].parent / "audit.jsonl") if r["kind"] == "refusal"]
        assert own[-1]["data"]["round"] == 3 and str(ledgers[site]) in own[-1]["data"]["reason"], "the full message"
    assert not ledgers["1"].exists() and all(ledgers[s].read_bytes() == tampered[s] for s in "02"), "nothing written"
    coordinator = verify_log(resumed.run_dir / "audit" / "coordinator.jsonl")
    assert coordinator.intact, coordinator.summary()
    refused = [r for r in read_records(resumed.run_dir / "audit" / "coordinator.jsonl") if r["kind"] == "refusal"]
    assert {r["data"]["rule"] for r in refused} == {LEDGER_RULE}

    # A run under a new name on the same data: the same sites, so the same ledgers (spent ε carried over). The unit
    # tests (test_ledger_anchor.py) train such a run; here: the path the simulated sites wrote is the renamed run's.
    renamed = replace(cfg, run=replace(cfg.run, name="other"))
    assert all(site_ledger_path(renamed, site) == ledgers[site] for site in "0123")
    entries = PrivacyLedger(ledgers["3"]).entries
    assert [(e.run, e.round) for e in entries] == [("first", 1), ("first", 2), ("first", 3)]
    assert third["site_epsilon"]["3"] == entries[-1].epsilon
