"""Smoke tests of the benchmark scripts at tiny sizes: each runs and ends with its summary line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPTS = {
    "secure_round.py": ["--model", "tiny-llama", "--sites", "3", "--rounds", "2", "--examples", "90"],
    "quantization.py": ["--hidden", "64", "--layers", "1", "--steps", "1", "--batch", "2", "--seq", "8"],
    "dp_overhead.py": ["--model", "tiny-llama", "--batch", "8", "--seq", "16", "--steps", "1"],
    "secagg_cost.py": ["--clients", "5", "--values", "1000", "--dropout-clients", "5"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_at_tiny_size(script):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *SCRIPTS[script]],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("summary:")
