"""Smoke test of benchmarks/scale.py at a tiny size: two client counts, one round, each in its own process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scale_prints_a_row_per_client_count_and_a_summary():
    # the benchmark measures the workers as descendants of its own Ray instance: not on the tests' shared cluster
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--clients", "2,3", "--rounds", "1",
                           "--examples-per-client", "5"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["clients", "trained/rnd", "rounds/min"])
    rows = [line.split() for line in lines[header + 1: header + 3]]
    assert [row[0] for row in rows] == ["2", "3"]
    for row in rows:
        assert row[1] == row[0]  # fraction_train 1.0: every client trains
        assert float(row[2]) > 0  # rounds per minute
        mib = [float(row[i]) for i in (5, 7, 9, 11)]  # driver RSS, workers RSS, driver + workers RSS, tree PSS
        assert all(v > 0 for v in mib)
        assert max(mib[0], mib[1]) - 1 <= mib[2] <= mib[0] + mib[1] + 1  # peaks of the sum vs the parts' peaks
        assert float(row[13]) > 0  # KiB uploaded per client per round
    assert re.match(r"summary: 3 clients: [\d.]+ rounds/min, peak driver\+workers RSS \d+ MiB, [\d.]+ KiB up per "
                    r"client per round; vs 2 clients: [\d.]+x slower rounds, [\d.]+x memory$", lines[-1]), lines[-1]
