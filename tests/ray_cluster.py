"""One Ray cluster for a whole test session, started on 127.0.0.1 when the session runs federations.

Flower's Ray backend starts a local Ray instance for each simulation and shuts it down at the end (measured on the
2-core machine: about 3 s to start, 1.5 s to stop, of each simulation's wall time). The suite runs many small
simulations, so it starts one cluster, points ``RAY_ADDRESS`` at it (the documented way to run on a cluster,
docs/scale.md) and every simulation, in-process or a ``fedpeft``/``flwr`` subprocess, connects to it; each one still
starts its own actors, which end with its Ray job. ``FEDPEFT_TESTS_RAY=fresh`` keeps the per-simulation instances.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

READY_TIMEOUT = 180.0  # seconds for `ray start` on a loaded 2-core machine
_READY_LINE = "Ray runtime started"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(temp_dir: Path) -> subprocess.Popen | None:
    """Start a head node in the foreground of its own process group (``--block``: stopping that process stops every
    Ray process it started, and nothing else on the machine, unlike ``ray stop``). Sets ``RAY_ADDRESS``; returns
    None, and leaves the per-simulation instances, when the cluster does not come up."""
    port = _free_port()
    log = temp_dir / "ray-start.log"
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(os.cpu_count() or 1),
               "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if _READY_LINE in log.read_text(errors="replace"):
            os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
            return process
        time.sleep(0.5)
    stop(process)
    warnings.warn(f"the tests' shared Ray cluster did not start (see {log}); each simulation starts its own",
                  stacklevel=2)
    return None


def stop(process: subprocess.Popen) -> None:
    os.environ.pop("RAY_ADDRESS", None)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
