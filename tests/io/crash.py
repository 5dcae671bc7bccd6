"""Real other processes for the tests: a writer crashed at an injection point (it ends on the spot, ``os._exit``,
so none of its ``finally`` or ``except`` runs -- what is on disk afterwards is what a power cut or ``kill -9``
leaves), and a process that holds a lock until it is killed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CRASH_EXIT = 17

_PRELUDE = """
import os, shutil, sys

CRASH_EXIT = {exit_code}


def crash_before(module, name, nth):
    real, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os._exit(CRASH_EXIT)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)
"""


def run_crashing(body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (Python, with ``crash_before(module, name, nth)`` available) in a fresh interpreter."""
    script = _PRELUDE.format(exit_code=CRASH_EXIT) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)


_HOLD = """
import sys
from fedpeft.io.lock import acquire
acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin or kills us
"""


def hold_in_subprocess(lock_path) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder
