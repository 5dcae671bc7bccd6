"""An exclusive lock on a directory, held by one process at a time: ``fcntl.flock`` on a lock file inside it.

The kernel releases a flock when its holder exits, however it exits (a crash, ``kill -9``), so a lock is never left
stale by a dead process and nothing has to be cleaned up. The lock file stays in place (removing it would let two
processes lock two different files of the same name); after locking, the holder writes who it is (PID, host, start
time, program) into it, so that a refused process can say who holds the directory.

Within one process the lock is counted: a part of the process that enters it again with ``reentrant=True`` (the
ServerApp, which `fedpeft simulate` runs in a thread of the process that already holds its run directory) shares
the hold; one that enters without it is refused like another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedpeft.errors import FedpeftError


class LockHeld(FedpeftError):
    """Another process (or another part of this one) holds the lock; ``holder`` says who, as it wrote it."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path = path
        self.holder = holder


@dataclass
class _Hold:
    fd: int
    count: int


_held: dict[Path, _Hold] = {}
_guard = threading.Lock()


def holder_description() -> str:
    """Who this process is, as a lock's holder: PID, host, start of the hold, program (and sub-command).

    Not the whole command line: its options may carry secrets (Flower passes the ServerApp a token in its argv)."""
    program = [os.path.basename(sys.argv[0])] if sys.argv and sys.argv[0] else []
    if len(sys.argv) > 1 and sys.argv[1].isidentifier():  # e.g. `fedpeft simulate`
        program.append(sys.argv[1])
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"PID {os.getpid()} on {socket.gethostname()} since {since} ({' '.join(program) or 'python'})"


def read_holder(path: str | Path) -> str:
    """What the lock's holder wrote into the lock file ('an unknown process' when it has not written yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def acquire(path: str | Path, *, reentrant: bool = False, wait: float = 0.0) -> None:
    """Lock ``path`` (created if absent) for this process, or raise LockHeld naming the holder.

    ``wait``: seconds to keep trying while another process holds it (one that is exiting releases it soon).
    """
    path = Path(path).absolute()
    deadline = time.monotonic() + wait
    with _guard:
        hold = _held.get(path)
        if hold is not None:
            if not reentrant:
                raise LockHeld(path, f"this process ({read_holder(path)})")
            hold.count += 1
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:  # another descriptor's flock conflicts even within this process: one holder at a time
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeld(path, read_holder(path)) from None
                time.sleep(0.2)
        text = (holder_description() + "\n").encode("utf-8")
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
    except BaseException:
        os.close(fd)
        raise
    with _guard:
        _held[path] = _Hold(fd, 1)


def release(path: str | Path) -> None:
    """Give up one hold of ``path``; the lock is released when the last one of this process is given up."""
    path = Path(path).absolute()
    with _guard:
        hold = _held.get(path)
        if hold is None:
            return
        hold.count -= 1
        if hold.count == 0:
            del _held[path]
            os.close(hold.fd)  # closing the descriptor releases the flock


def held_here(path: str | Path) -> bool:
    """Whether this process holds the lock on ``path``."""
    with _guard:
        return Path(path).absolute() in _held


@contextlib.contextmanager
def locked(path: str | Path, *, reentrant: bool = False, wait: float = 0.0) -> Iterator[None]:
    acquire(path, reentrant=reentrant, wait=wait)
    try:
        yield
    finally:
        release(path)
