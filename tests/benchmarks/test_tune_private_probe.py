"""benchmarks/tune_private_probe.py on a tiny generated banking77: a 2 x 2 grid and the derived default scored on
the sites' held-out rows, resumable from its log, and the noise it uses is the accountant's."""

from __future__ import annotations

import json
import math

import pytest

from fedpeft.privacy import defaults
from tests.benchmarks.scripts import load_script
from tests.benchmarks.test_real_data import _write_fake_banking77

tune = load_script("tune_private_probe")


def test_the_noise_is_the_accountants_and_does_not_depend_on_the_dimension():
    small, large = tune.noise_std(1.0, 100, 100, 1e-5), tune.noise_std(1.0, 100, 30_000, 1e-5)
    assert small == pytest.approx(large, rel=0.02)
    assert small / math.sqrt(100) == pytest.approx(defaults.noise_per_root_round(target_epsilon=1.0, delta=1e-5),
                                                   rel=0.02)


@pytest.mark.slow
def test_a_tiny_grid_scores_on_held_out_rows_and_resumes(tmp_path, capsys):
    _write_fake_banking77(tmp_path / "data")
    log = tmp_path / "grid.jsonl"
    argv = ["--data-dir", str(tmp_path / "data"), "--sites", "3", "--epsilons", "8", "--rounds", "5,10",
            "--lrs", "2,4", "--seeds", "1", "--max-length", "16", "--model", "tiny-llama",
            "--cache", str(tmp_path / "cache"), "--results", str(log)]
    rows = tune.main(argv)
    assert len(rows) == 5 and sum(bool(r.get("defaults")) for r in rows) == 1
    assert all(0.0 <= r["validation_accuracy"] <= 1.0 and r["epsilon"] == 8.0 for r in rows)
    assert "defaults rounds" in capsys.readouterr().out
    again = tune.main(argv)  # every point reused from the log
    assert [r["validation_accuracy"] for r in again] == [r["validation_accuracy"] for r in rows]
    lines = log.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["key"] for line in lines)
