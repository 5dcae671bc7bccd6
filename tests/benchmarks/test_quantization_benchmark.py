"""Smoke test of benchmarks/quantization.py at a tiny size: it runs and prints its table and summary line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quantization_benchmark_runs_at_tiny_size():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantization.py"), "--hidden", "64",
                           "--layers", "1", "--steps", "1", "--batch", "2", "--seq", "8"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nf4-fp32" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("summary:")
