"""benchmarks/private_probe.py end to end on a tiny generated banking77: the baselines, one distributed-DP row
through a real Flower simulation, a results log that a second invocation reuses."""

from __future__ import annotations

import json

import pytest

from fedpeft.privacy.defaults import probe_schedule
from tests.benchmarks.scripts import load_script
from tests.benchmarks.test_real_data import _write_fake_banking77

private_probe = load_script("private_probe")


def test_rounds_per_epsilon():
    args = private_probe.parse(["--rounds", "1:100,4:200,8:300"])
    assert [private_probe.rounds_for(args, e) for e in (1.0, 2.0, 4.0, 8.0, 16.0)] == [100, 100, 200, 300, 300]
    assert private_probe.rounds_for(private_probe.parse(["--rounds", "7"]), 8.0) == 7
    auto = private_probe.parse([])  # the default: fedpeft's derived schedule for the sites' rows
    auto.total_rows = 9000
    derived = probe_schedule(target_epsilon=4.0, total_rows=9000)
    assert private_probe.rounds_for(auto, 4.0) == derived.rounds
    assert private_probe.learning_rate_for(auto, 4.0) == derived.learning_rate


@pytest.mark.slow
def test_a_tiny_private_probe_comparison_runs_and_resumes(tmp_path, capsys):
    _write_fake_banking77(tmp_path / "data")
    log = tmp_path / "results.jsonl"
    argv = ["--data-dir", str(tmp_path / "data"), "--sites", "3", "--rounds", "4", "--epsilons", "8",
            "--max-length", "16", "--model", "tiny-llama", "--epochs-alone", "20", "--cache", str(tmp_path / "cache"),
            "--results", str(log)]
    rows = private_probe.main(argv)
    assert [r.name for r in rows] == ["pooled", "alone", "ddp8"]
    assert 7.9 < rows[2].epsilon <= 8.0 + 1e-9 and rows[2].rounds == 4  # spent up to the accountant's tolerance
    assert set(rows[1].site_accuracy) == {"0", "1", "2"}
    assert "ddp8: better than" in capsys.readouterr().out
    again = private_probe.main(argv)  # everything reused from the log: no simulation runs
    assert [r.accuracy for r in again] == [r.accuracy for r in rows]
    assert len(log.read_text().splitlines()) == 3 and json.loads(log.read_text().splitlines()[0])["schema_version"]
