"""`fedpeft --version`: the installed package's version, exit 0."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_version_prints_the_package_version_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "fedpeft.cli", "--version"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fedpeft {version('fedpeft')}"
