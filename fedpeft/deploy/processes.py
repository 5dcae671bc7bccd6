"""Starting and stopping Flower's own processes (flower-superlink, flower-supernode, flwr) for fedpeft's commands."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedpeft.errors import DeployError


def flower_executable(name: str) -> str:
    """The Flower command ``name`` of this Python environment (next to its interpreter), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"Flower's `{name}` command is not installed in this environment; install fedpeft with "
                          "`pip install fedpeft` (it brings flwr) and run fedpeft from that environment")
    return found


def runtime_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of Flower's processes: their own FLWR_HOME, no downloads, no per-run dependency installs."""
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
           "PATH": with_own_scripts(os.environ.get("PATH", ""))}
    env.update(extra or {})
    return env


def with_own_scripts(path: str) -> str:
    """``path`` with this interpreter's scripts directory first: Flower's processes spawn their children
    (``flower-superexec``, ``flwr-clientapp``) by name, and a venv that was never activated is not on PATH (the
    systemd unit in docs/deployment.md runs ``/venv/bin/fedpeft`` exactly so)."""
    scripts = str(Path(sys.executable).parent)
    parts = [p for p in path.split(os.pathsep) if p and p != scripts]
    return os.pathsep.join([scripts, *parts])


def start(command: Sequence[str], log_file: Path, env: Mapping[str, str], *, cwd: Path | None = None,
          pipe: bool = False) -> subprocess.Popen:
    """Start ``command`` in its own process group (so that stop() also ends the processes it spawns)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if pipe:
        return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env),
                                cwd=cwd, start_new_session=True, text=True, preexec_fn=_end_with_parent)
    with log_file.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                start_new_session=True, preexec_fn=_end_with_parent)


def _end_with_parent() -> None:
    """Linux: SIGTERM the child when fedpeft dies, however it dies (a killed coordinator must not leave its
    SuperLink holding the port, nor a killed agent its SuperNode)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def check_port_free(host: str, port: int, wait: float = 30.0, fix: str | None = None) -> None:
    """DeployError if something still listens on ``host:port`` after ``wait`` seconds (a coordinator that is still
    running, or one still shutting down after a crash); ``fix`` replaces the coordinator's advice."""
    import socket
    import time

    deadline = time.monotonic() + wait
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink's server does
            try:
                sock.bind((host, port))
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    raise DeployError(f"port {port} on {host} is in use ({err.strerror}); " + (
                        fix or "stop what holds it (another `fedpeft server`?) or choose another --port")) from None
        time.sleep(1.0)


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class Supervised:
    """A long-lived helper process beside Flower's (the site's warm worker): its output goes to ``log_file``, lines
    starting with ``marker`` are also echoed (without it), and it is started again, with a message, when it dies."""

    def __init__(self, name: str, command: Sequence[str], log_file: Path, env: Mapping[str, str], *,
                 echo: Callable[[str], None], marker: str, cwd: Path | None = None, restart_delay: float = 2.0):
        self.name, self.command, self.log_file, self.env = name, list(command), log_file, dict(env)
        self.echo, self.marker, self.cwd, self.restart_delay = echo, marker, cwd, restart_delay
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self, ready: Callable[[], bool], timeout: float) -> None:
        """Start it and wait until ``ready()``; DeployError with its last log lines if it ends or times out first."""
        self._launch()
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.process.poll()
                self.stop()
                why = f"ended with exit code {code}" if code is not None else f"was not ready after {timeout:.0f} s"
                raise DeployError(f"the {self.name} {why}; its last log lines:\n{tail(self.log_file)}\n(full log: "
                                  f"{self.log_file})")
            time.sleep(0.5)
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"{self.name}-watch")
        self._watcher.start()

    def _launch(self) -> None:
        self.process = start(self.command, self.log_file, self.env, cwd=self.cwd, pipe=True)
        threading.Thread(target=self._pump, args=(self.process,), daemon=True, name=f"{self.name}-output").start()

    def _pump(self, process: subprocess.Popen) -> None:
        with self.log_file.open("a", encoding="utf-8") as log:
            for line in process.stdout or ():
                log.write(line)
                log.flush()
                if line.startswith(self.marker):
                    self.echo(line[len(self.marker):].rstrip())

    def _watch(self) -> None:
        while not self._stopping.is_set():
            assert self.process is not None
            code = self.process.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            self.echo(f"the {self.name} ended (exit code {code}); starting it again (restart {self.restarts}; "
                      f"log: {self.log_file})")
            if self._stopping.wait(min(60.0, self.restart_delay * 2 ** min(self.restarts - 1, 5))):
                return
            with self._lock:  # never a fresh process after stop() has run
                if self._stopping.is_set():
                    return
                self._launch()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        if self.process is not None:
            stop(self.process)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=15)
