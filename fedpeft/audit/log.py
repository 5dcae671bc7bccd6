"""The append-only audit log: JSON lines, each signed with Ed25519 and chained to the one before by SHA-256.

A record is ``{"schema_version", "seq", "time", "writer", "key_id", "kind", "data", "prev", "sig"}``: ``seq`` counts
from 0, ``time`` is UTC (never earlier than the record before), ``prev`` is the SHA-256 of the previous line's exact
bytes (64 zeros for the first), ``sig`` the Ed25519 signature (base64) over the record's canonical JSON without
``sig``. Each append is flushed and fsync'd under an exclusive lock, so several processes of one writer (a site's
agent runs one per message) append in turn. A crash mid-write leaves a partial last line; the next append moves
those bytes to ``<log>.torn`` and records a ``recovered`` entry saying so, so the log is never silently shorter.

``schema_version`` is in every record rather than in a header line: a site's log stays open across runs, and so
across fedpeft upgrades, so one file holds records of several versions and each must say how it is read. Inside the
record it is signed and chained like every other field (nobody can relabel a record's version unnoticed), an append
still reads only the last line, and record 0 stays the run-start record with seq 0. Records written before the field
existed have none and are version 1; verify() accepts both. A reader (verify, read_records, an append, which must
understand the last record to continue the chain) refuses a record from a newer fedpeft with an AuditError that says
"upgrade fedpeft", rather than judging it damaged or intact by rules it does not know.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedpeft.audit.keys import key_id, public_key_b64
from fedpeft.errors import AuditError
from fedpeft.io.schema import SCHEMA_VERSION_KEY, UNVERSIONED, check_schema_version

GENESIS = "0" * 64
SCHEMA_VERSION = 1  # of each record; bump when a record's fields or signing change meaning
FIELDS = (SCHEMA_VERSION_KEY, "seq", "time", "writer", "key_id", "kind", "data", "prev", "sig")
UNVERSIONED_FIELDS = FIELDS[1:]  # a record written before schema_version existed (version 1)


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def check_record_version(record: dict[str, Any], source: str) -> int:
    """The record's schema version (1 when it has none); AuditError when this fedpeft cannot read it."""
    return check_schema_version(record.get(SCHEMA_VERSION_KEY, UNVERSIONED), SCHEMA_VERSION, source=source,
                                error=AuditError)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
                if isinstance(last, dict):  # a newer record's seq/time may mean something else: refuse, not guess
                    check_record_version(last, f"audit log {self.path} (line {len(lines)})")
                seq, prev = int(last["seq"]) + 1, line_hash(lines[-1])
                time = max(time, str(last["time"]))  # never before the record it follows (a clock stepped back)
            except (ValueError, KeyError, TypeError) as err:
                raise AuditError(f"audit log {self.path}: its last line is not a record ({err}); nothing was "
                                 f"appended. Run `fedpeft audit verify {self.path}` to see the damage") from None
        record = {SCHEMA_VERSION_KEY: SCHEMA_VERSION, "seq": seq, "time": time, "writer": self.writer,
                  "key_id": self.key_id, "kind": kind, "data": data, "prev": prev}
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
    """The complete records of a log (for reports; use verify() to check them); AuditError for a newer record."""
    lines = Path(path).read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            record = json.loads(line)
            if isinstance(record, dict):
                check_record_version(record, f"audit log {path} (line {number})")
            records.append(record)
    return records
