"""Where a run writes: ``<run.out_dir>/<run.name>/`` with metrics, summary, resolved config and adapters.

One run per directory: whoever writes a run directory holds ``run.lock`` in it (``fcntl.flock``, released by the
kernel when the holder exits, however it exits). `fedpeft simulate` claims the directory before anything starts
(``claim_run_dir``: a new run takes the first free name, ``--resume`` the named one); the ServerApp holds it for the
whole run (``open_run_dir``; inside `fedpeft simulate` it shares the simulate process's hold). A second process is
refused with the holder's PID and the fix.

A directory that holds a run is continued only when its files agree (``check_resume``): ``server_state.safetensors``
present and readable, its run config the same (more rounds or another timeout allowed), and ``metrics.jsonl``
counting 0, 1, ... up to the state's round. Nothing is written before that check passes; then a crash's leftovers are
repaired (a torn last metrics line moved to ``metrics.jsonl.torn``, an interrupted adapter-directory swap finished,
stray temp files removed) and ``run_config.json`` is rewritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.errors import FederationError
from fedpeft.io.atomic import complete_lines, recover_dirs_in, recover_torn_tail, write_json_atomic
from fedpeft.io.lock import LockHeld, acquire, release
from fedpeft.runs.state import STATE_FILE, check_resumable, check_state_matches_log, load_server_state

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "run_config.json"
MANIFEST_FILE = "upload_manifest.json"  # names, shapes and bytes of the tensors one site upload carries
LOCK_FILE = "run.lock"  # held (flock) by the process writing the run; holds its PID, host and program
ADAPTERS_DIR = "adapters"
SERVERAPP_LOCK_WAIT = 20.0  # seconds the ServerApp waits for an exiting holder before it refuses the directory

log = logging.getLogger("fedpeft")


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.run.out_dir).expanduser() / cfg.run.name


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but its lock file (an earlier run, or one under way)."""
    return run_dir.is_dir() and any(item.name != LOCK_FILE for item in run_dir.iterdir())


def free_run_name(out_dir: str | Path, name: str) -> str:
    """``name`` if ``out_dir/name`` holds no earlier run, else the first free ``name-2``, ``name-3``, ...

    Only a hint: another process may take the name next. ``claim_run_dir`` takes one under its lock."""
    out_dir = Path(out_dir).expanduser()
    candidate, suffix = name, 2
    while holds_a_run(out_dir / candidate):
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return candidate


def lock_run_dir(run_dir: Path, *, reentrant: bool = False, wait: float = 0.0) -> None:
    """Hold ``run_dir``'s lock, or raise FederationError naming the process that holds it and the fix."""
    try:
        acquire(run_dir / LOCK_FILE, reentrant=reentrant, wait=wait)
    except LockHeld as held:
        raise FederationError(
            f"run directory {run_dir} is in use by another fedpeft run: {held.holder}. Two runs in one directory "
            "would interleave their rounds in one metrics log and audit log. Wait for that run to end (the lock is "
            f"released when its process exits), or give this run another name (--name / run.name)") from None


def unlock_run_dir(run_dir: Path) -> None:
    release(run_dir / LOCK_FILE)


@contextlib.contextmanager
def claim_run_dir(cfg: RunConfig, *, resume: bool) -> Iterator[RunConfig]:
    """Hold a run directory for ``cfg`` while the body runs; yields ``cfg`` with the run name taken.

    A new run (``resume`` False) takes ``run.name``, or the first of ``name-2``, ``name-3``, ... that holds no run
    and that no other process holds. ``resume`` takes ``run.name`` itself, and only after ``check_resume``
    accepted it. Nothing is written but the lock file.
    """
    if not resume:
        out_dir, name, suffix = Path(cfg.run.out_dir).expanduser(), cfg.run.name, 2
        candidate = name
        while True:
            run_dir = out_dir / candidate
            if not holds_a_run(run_dir):
                try:
                    lock_run_dir(run_dir)
                except FederationError:
                    pass  # another process is starting a run under this name: take the next one
                else:
                    if not holds_a_run(run_dir):  # still empty now that it is ours
                        break
                    unlock_run_dir(run_dir)
            candidate, suffix = f"{name}-{suffix}", suffix + 1
        cfg = replace(cfg, run=replace(cfg.run, name=candidate))
    else:
        run_dir = run_dir_of(cfg)
        if not run_dir.is_dir():
            raise FederationError(f"--resume: there is no run directory {run_dir} to continue; check --out and "
                                  "--name (run.out_dir, run.name), or start the run without --resume")
        lock_run_dir(run_dir)
        try:
            if load_server_state(run_dir, tensors=False) is None:
                raise FederationError(
                    f"--resume: {run_dir / STATE_FILE} is missing, so {run_dir} cannot be continued: no round of it "
                    "completed, or the file was removed. Without it the run would restart at round 0 and log its "
                    "rounds twice. Restore the file from a backup, or start a new run without --resume (it takes "
                    f"a free name next to {cfg.run.name})")
            check_resume(run_dir, cfg)
        except BaseException:
            unlock_run_dir(run_dir)
            raise
    try:
        yield cfg
    finally:
        unlock_run_dir(run_dir)


def check_resume(run_dir: Path, cfg: RunConfig) -> int:
    """Whether ``run_dir`` may be run under ``cfg``; reads only. Returns the next round (1 for a fresh directory).

    Refused (FederationError, ConfigError): a metrics log without ``server_state.safetensors``, a state that cannot
    be read, comes from another run config, or does not continue the metrics log.
    """
    logged = logged_rounds(run_dir / METRICS_FILE)
    state = load_server_state(run_dir, tensors=False)
    if state is None:
        if logged:
            raise FederationError(
                f"{run_dir / METRICS_FILE} logs rounds 0-{logged[-1]}, but {run_dir / STATE_FILE} is missing: the "
                "run cannot be continued (it would restart at round 0 and log its rounds twice). Restore "
                f"{STATE_FILE} from a backup, or start a new run under another run.name / --name")
        return 1
    check_resumable(state, cfg, run_dir)
    check_state_matches_log(state, logged, run_dir, METRICS_FILE)
    return state.completed_round + 1


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Check that the run directory may be run under ``cfg`` (``check_resume``), repair what a crash left, and
    write the resolved config. The caller holds the directory (``open_run_dir`` does both)."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resume(run_dir, cfg)  # before anything is written: a refused run leaves the directory as it was
    repair_run_dir(run_dir)
    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_nested())
    return run_dir


@contextlib.contextmanager
def open_run_dir(cfg: RunConfig, *, wait: float = SERVERAPP_LOCK_WAIT) -> Iterator[Path]:
    """Hold the run directory (sharing a hold this process already has) and prepare it; for the ServerApp.

    ``wait``: seconds to wait for another holder to exit first (a restarted coordinator's ServerApp may start while
    the one of the coordinator that crashed is still shutting down: Flower stops it when its SuperLink is gone)."""
    run_dir = run_dir_of(cfg)
    lock_run_dir(run_dir, reentrant=True, wait=wait)
    try:
        yield prepare_run_dir(cfg)
    finally:
        unlock_run_dir(run_dir)


def repair_run_dir(run_dir: Path) -> None:
    """Undo what a crash left half-done: a torn last metrics line, an interrupted adapter swap, stray temp files."""
    torn = recover_torn_tail(run_dir / METRICS_FILE)
    if torn:
        log.warning("%s ended in a partial line (a crash while it was written): its %d bytes were moved to %s.torn",
                    run_dir / METRICS_FILE, torn, METRICS_FILE)
    for name, done in recover_dirs_in(run_dir / ADAPTERS_DIR).items():
        log.warning("%s/%s was being replaced when the last run stopped: %s", run_dir / ADAPTERS_DIR, name, done)
    for folder in (run_dir, run_dir / ADAPTERS_DIR):
        if folder.is_dir():
            for stray in folder.glob(".*.tmp"):  # a file write_bytes_atomic never renamed into place
                if stray.is_file():
                    stray.unlink()


def logged_rounds(metrics_file: Path) -> list[int]:
    """The rounds of the complete lines of ``metrics.jsonl``, checked to count 0, 1, 2, ...

    A partial last line (a crash mid-write) is not a line yet and is left out. A complete line that is not a round
    record, or a round out of sequence (two runs wrote the file), is a FederationError naming the line.
    """
    rounds: list[int] = []
    for number, line in enumerate(complete_lines(metrics_file), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)["round"]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"round {value!r} is not an integer")
        except (ValueError, KeyError, TypeError) as err:
            raise FederationError(f"{metrics_file} line {number} is not a round record ({err}); the file is damaged. "
                                  "Restore it from a backup, or start a new run under another run.name") from None
        if value != len(rounds):
            raise FederationError(
                f"{metrics_file} line {number} logs round {value} where round {len(rounds)} was due (after "
                f"{rounds[-5:]}): more than one run wrote this file, or it was edited. The run cannot be continued "
                "from it; start a new run under another run.name (--name)")
        rounds.append(value)
    return rounds


def last_logged_round(metrics_file: Path) -> int:
    """The round of the last complete line of ``metrics.jsonl`` (-1 when there is none); a torn tail is ignored."""
    lines = [line for line in complete_lines(metrics_file) if line.strip()]
    if not lines:
        return -1
    try:
        return int(json.loads(lines[-1])["round"])
    except (ValueError, KeyError, TypeError) as err:
        raise FederationError(f"{metrics_file}: its last line is not a round record ({err}); restore the file from "
                              "a backup, or start a new run under another run.name") from None
