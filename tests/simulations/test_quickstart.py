"""The quick-start path (real pretrained MiniLM, generated data, label skew) at a small size."""

from __future__ import annotations

import pytest

from fedpeft.composition import from_mapping
from fedpeft.simulations.engine import simulate
from fedpeft.simulations.report import print_result

pytestmark = pytest.mark.slow


def test_federated_minilm_beats_round_zero_and_the_majority_baseline(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the README's path: a fresh local Ray instance
    cfg = from_mapping({"federation": {"rounds": 2, "num_sites": 3},
                        "data": {"synthetic_examples": 450},
                        "run": {"out_dir": str(tmp_path)}})
    result = simulate(cfg)
    initial, final = result.summary["initial_accuracy"], result.summary["final_accuracy"]
    assert final > initial + 0.15, (initial, final)
    assert final > result.majority_baseline + 0.15, (result.majority_baseline, final)
    print_result(result)
    shown = capsys.readouterr().out
    assert "majority-class baseline" in shown and "round 0 (untrained adapter)" in shown
