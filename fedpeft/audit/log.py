"""The append-only audit log: JSON lines, each signed with Ed25519 and chained to the one before by SHA-256.

A record is ``{"seq", "time", "writer", "key_id", "kind", "data", "prev", "sig"}``: ``seq`` counts from 0, ``time``
is UTC (never earlier than the record before), ``prev`` is the SHA-256 of the previous line's exact bytes (64 zeros
for the first), ``sig`` the Ed25519 signature (base64) over the record's canonical JSON without ``sig``. Each append
is flushed and fsync'd under an exclusive lock, so several processes of one writer (a site's agent runs one per
message) append in turn. A crash mid-write leaves a partial last line; the next append moves those bytes to
``<log>.torn`` and records a ``recovered`` entry saying so, so the log is never silently shorter.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpeft.audit.keys import key_id, public_key_b64
from fedpeft.errors import AuditError

GENESIS = "0" * 64
FIELDS = ("seq", "time", "writer", "key_id", "kind", "data", "prev", "sig")


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Appends signed records to ``path`` as ``writer`` (e.g. "coordinator", "site:3")."""

    def __init__(self, path: str | Path, key: Any, writer: str) -> None:
        self.path = Path(path)
        self.key = key
        self.writer = writer
        self.public_key = public_key_b64(key)
        self.key_id = key_id(self.public_key)

    def append(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                content = handle.read()
                if content and not content.endswith(b"\n"):
                    content = self._recover_torn_tail(handle, content)
                record = self._next_record(content, kind, data)
                handle.write(canonical(record) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return record

    def _next_record(self, content: bytes, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        lines = content.splitlines()
        seq, prev, time = 0, GENESIS, utc_now()
        if lines:
            try:
                last = json.loads(lines[-1])
                seq, prev = int(last["seq"]) + 1, line_hash(lines[-1])
                time = max(time, str(last["time"]))  # never before the record it follows (a clock stepped back)
            except (ValueError, KeyError, TypeError) as err:
                raise AuditError(f"audit log {self.path}: its last line is not a record ({err}); nothing was "
                                 f"appended. Run `fedpeft audit verify {self.path}` to see the damage") from None
        record = {"seq": seq, "time": time, "writer": self.writer, "key_id": self.key_id, "kind": kind,
                  "data": data, "prev": prev}
        record["sig"] = base64.b64encode(self.key.sign(canonical(record))).decode("ascii")
        return record

    def _recover_torn_tail(self, handle: Any, content: bytes) -> bytes:
        """Move a partial last line (a crash mid-write) to <log>.torn and keep the complete lines."""
        cut = content.rfind(b"\n") + 1
        torn = content[cut:]
        aside = self.path.with_name(self.path.name + ".torn")
        with open(aside, "ab") as out:
            out.write(torn + b"\n")
            out.flush()
            os.fsync(out.fileno())
        handle.truncate(cut)
        handle.seek(cut)
        kept = content[:cut]
        recovered = self._next_record(kept, "recovered", {
            "torn_bytes": len(torn), "torn_sha256": hashlib.sha256(torn).hexdigest(), "moved_to": aside.name})
        line = canonical(recovered) + b"\n"
        handle.write(line)
        return kept + line


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a log (for reports; use verify() to check them)."""
    lines = Path(path).read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]
