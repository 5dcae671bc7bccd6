"""What leaves a site besides its update: held-out scores coarsened by the run, withheld by a site's policy."""

from __future__ import annotations

import json

import pytest

from fedpeft.composition import from_mapping
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow


def test_a_site_policy_withholds_scores_and_the_run_coarsens_the_rest(tmp_path):
    (tmp_path / "site-0.toml").write_text('[policy]\nmax_epsilon = 8.0\nrequire_dp = false\nsite_metrics = "none"\n')
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "federation": {"rounds": 1, "num_sites": 3},
        "data": {"synthetic_examples": 150},
        "privacy": {"site_metrics": "coarse", "policy_file": str(tmp_path / "site-{site}.toml"),
                    "policy_optional": True},
        "run": {"name": "metrics", "out_dir": str(tmp_path)},
    })
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert rounds[1]["sites_returned"] == 3 and not rounds[1]["failures"], "withholding scores is not a failure"
    for record in rounds:
        assert set(record["site_accuracy"]) == {"1", "2"}, "site 0's policy releases no held-out score"
        for score in record["site_accuracy"].values():
            assert abs(score / 0.05 - round(score / 0.05)) < 1e-9, f"{score} is not on the 0.05 grid"
    assert result.summary["final_accuracy"] is not None
