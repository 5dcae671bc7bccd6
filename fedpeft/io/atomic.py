"""Atomic and append-only writes: a crash leaves either the old file or the new one, never a torn one.

- A file is written to a temporary sibling, fsync'd, renamed over the target, and the directory fsync'd
  (``write_bytes_atomic``): after a crash the target holds the old bytes or the new ones.
- A directory is built under a temporary name, fsync'd file by file, renamed to ``.<name>.new`` (its presence says
  the new copy is complete), and swapped in: ``<name>`` → ``.<name>.old``, ``.<name>.new`` → ``<name>``, then the
  old copy removed (``write_dir_atomic``). At every instant the old or the new copy is on disk under a known name;
  ``recover_dir`` (run by the next write, and by the owner of the directory at start) finishes a swap a crash
  interrupted, and ``settled_dir`` finds the current copy without writing anything.
- A JSON-lines file is appended to with one fsync'd write per line (``append_jsonl``). A crash mid-write leaves a
  partial last line; the next append, or ``recover_torn_tail``, moves those bytes to ``<file>.torn`` (as the audit
  log does) so that the file again ends with a complete line, and no later line is glued to the fragment.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TORN_SUFFIX = ".torn"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int | None = None, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` as a whole: temp file, fsync, rename, fsync of the directory.

    ``mode``: the file's permissions from its first byte (default 0600, the temp file's). ``overwrite=False``:
    refuse (FileExistsError) when ``path`` exists, atomically (the temp file is hard-linked to ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(Path(tmp), path, data, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _link_new(tmp: Path, path: Path, data: bytes, mode: int | None) -> None:
    """Put the complete ``tmp`` at ``path`` only if ``path`` does not exist (FileExistsError otherwise)."""
    try:
        os.link(tmp, path)  # atomic, and fails if path exists, whoever created it meanwhile
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: create exclusively and write in place, fsync'd
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    tmp.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _new(path: Path) -> Path:
    return path.with_name(f".{path.name}.new")


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, then ``root`` itself."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(directory))


def write_dir_atomic(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with ``fill(tmp_dir)`` and put it at ``path``, replacing any directory there as a whole.

    A crash at any point leaves ``path`` (old copy), ``.<name>.old`` + ``.<name>.new`` (both copies, mid-swap) or
    ``path`` (new copy): never neither. Call ``recover_dir(path)`` (done here before building) to settle it.
    One writer per ``path`` at a time: the caller holds the directory's owner lock (a run directory's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, _new(path))  # from here on the new copy is complete, and recover_dir may swap it in
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    _swap_in(path)


def _swap_in(path: Path) -> None:
    """Put the complete ``.<name>.new`` at ``path``; the copy it replaces is kept as ``.<name>.old`` until then."""
    new, old = _new(path), _old(path)
    if path.exists():
        if old.exists():  # left by an earlier swap that finished: path is newer than it, .new newer still
            shutil.rmtree(old)
        os.rename(path, old)
        fsync_dir(path.parent)
    os.rename(new, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
        fsync_dir(path.parent)


def recover_dir(path: str | Path) -> str | None:
    """Settle ``path`` after a crash in ``write_dir_atomic``; what was done ('finished', 'restored', 'cleaned') or
    None when there was nothing to do. A complete new copy is swapped in (a crash after it was built); a partial
    build is removed; the old copy comes back only when no new one exists. Only for the directory's one writer."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    done = None
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if partial.is_dir():
            shutil.rmtree(partial)
            done = "cleaned"
    new, old = _new(path), _old(path)
    if new.is_dir():
        _swap_in(path)
        return "finished"
    if old.is_dir():
        if path.is_dir():
            shutil.rmtree(old)
            done = "cleaned"
        else:
            os.rename(old, path)
            done = "restored"
        fsync_dir(path.parent)
    return done


def recover_dirs_in(parent: str | Path) -> dict[str, str]:
    """``recover_dir`` for every directory of ``parent`` that a crash left mid-write: {name: what was done}."""
    parent = Path(parent)
    if not parent.is_dir():
        return {}
    names = set()
    for item in parent.iterdir():
        name = item.name
        if not name.startswith(".") or not item.is_dir():
            continue
        for suffix in (".new", ".old"):
            if name.endswith(suffix):
                names.add(name[1:-len(suffix)])
        if name.endswith(".tmp") and name.count(".") >= 3:  # .<name>.<random>.tmp
            names.add(name[1:name.rindex(".", 0, len(name) - len(".tmp"))])
    done = {}
    for name in sorted(names):
        result = recover_dir(parent / name)
        if result:
            done[name] = result
    return done


def settled_dir(path: str | Path) -> Path | None:
    """Where the current copy of a directory written by ``write_dir_atomic`` is, without changing anything:
    ``path``, or mid-swap the complete new copy (or the old one); None when there is none."""
    path = Path(path)
    for candidate in (path, _new(path), _old(path)):
        if candidate.is_dir():
            return candidate
    return None


def _move_torn_tail(path: Path, handle: BinaryIO) -> int:
    """Move the bytes after the last newline of the open, locked ``handle`` to ``<path>.torn``; returns their count."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return 0
    handle.seek(0)
    content = handle.read()
    cut = content.rfind(b"\n") + 1
    torn = content[cut:]
    with open(path.with_name(path.name + TORN_SUFFIX), "ab") as aside:
        aside.write(torn + b"\n")
        aside.flush()
        os.fsync(aside.fileno())
    handle.truncate(cut)
    handle.flush()
    os.fsync(handle.fileno())
    return len(torn)


def recover_torn_tail(path: str | Path) -> int:
    """Move a partial last line of a JSON-lines file (a crash mid-append) to ``<path>.torn``; the bytes moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            return _move_torn_tail(path, handle)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def complete_lines(path: str | Path) -> list[bytes]:
    """The newline-terminated lines of ``path`` (none if it is absent); a partial last line is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    content = path.read_bytes()
    return content[:content.rfind(b"\n") + 1].splitlines()


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one JSON line, flushed and fsync'd before returning (a torn last line is moved aside first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
    created = not path.exists()
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            _move_torn_tail(path, handle)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    if created:
        fsync_dir(path.parent)
