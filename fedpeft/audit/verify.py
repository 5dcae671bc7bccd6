"""Offline verification of an audit log: chain, signatures, sequence, timestamps, completeness.

The first bad record is named with the kind of damage:
``edited`` (a record's content no longer matches its signature or chain), ``deleted`` (a sequence number is missing
and never appears), ``inserted`` (a record that repeats an earlier one), ``reordered`` (a record out of sequence
that does appear elsewhere), ``truncated`` (a partial last line, or no ``run-end`` record), ``wrong key`` (no
record verifies under the given public key), and ``timestamp`` (time going backwards).

One more kind is a privacy failure in records that are themselves genuine: ``epsilon decreased``. A site's
cumulative ε only ever grows (its ledger composes every release it made), so a site's ε lower than one recorded
before it means its ledger was reset, cut or edited and its privacy spent is under-reported: in the coordinator's
log, a site's ε in a later round (or in the run-end record) below its ε in an earlier round; in a site's log, a
release's ε below an earlier release's (in any run). Every such record is named.

A record may carry ``schema_version`` (written since versions exist) or not (older logs, version 1): both verify, as
the signature covers whichever fields the writer signed. A record from a newer fedpeft is not judged at all, since
its chain or signature rules may have changed: verify_log raises AuditError saying "upgrade fedpeft", so that a
newer log is never reported as damaged (or intact) by an older verifier. A malformed version is ``edited``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.audit.keys import key_id
from fedpeft.audit.log import FIELDS, GENESIS, UNVERSIONED_FIELDS, canonical, check_record_version, line_hash
from fedpeft.io.schema import SCHEMA_VERSION_KEY, UNVERSIONED, is_schema_version

END_KINDS = ("run-end",)  # a coordinator's log ends with one; a site's log stays open across runs
EPSILON_DECREASED = "epsilon decreased"
EPSILON_TOLERANCE = 1e-9  # relative: equal epsilons may be recomputed with rounding of this size


@dataclass(frozen=True)
class Damage:
    kind: str
    line: int  # 1-based line in the file
    seq: int | None
    detail: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{self.kind}: {where}: {self.detail}"


@dataclass
class Verification:
    path: Path
    public_key: str | None
    records: list[dict[str, Any]] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    key_source: str = ""

    @property
    def intact(self) -> bool:
        return not self.damage

    @property
    def privacy_failures(self) -> list[Damage]:
        """The ``epsilon decreased`` findings (genuine records that report a site's ε going down)."""
        return [d for d in self.damage if d.kind == EPSILON_DECREASED]

    def summary(self) -> str:
        if self.intact:
            return (f"{self.path}: intact — {len(self.records)} records, chain and signatures verified with key "
                    f"{key_id(self.public_key) if self.public_key else '?'} ({self.key_source})")
        if len(self.privacy_failures) == len(self.damage):
            return (f"{self.path}: PRIVACY FAILURE — chain and signatures verify, but a site's ε decreased "
                    f"({len(self.damage)} record(s)); first: {self.damage[0]}")
        return f"{self.path}: DAMAGED — first problem: {self.damage[0]}"


def _signature_ok(record: dict[str, Any], public_key: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    unsigned = {k: v for k, v in record.items() if k != "sig"}
    try:
        public_key.verify(base64.b64decode(str(record.get("sig", ""))), canonical(unsigned))
        return True
    except (InvalidSignature, ValueError):
        return False


def _load_public(b64: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64))


def _parse(path: Path, result: Verification) -> list[tuple[int, bytes, dict[str, Any]]]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:
        result.damage.append(Damage("truncated", len(lines), None, "the last line is partial (a crash mid-write, "
                                    "or a cut file); appending to the log moves it to <log>.torn and records that"))
    parsed = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
            if isinstance(record, dict):
                version = record.get(SCHEMA_VERSION_KEY, UNVERSIONED)
                if not is_schema_version(version):
                    raise ValueError(f"{SCHEMA_VERSION_KEY} {version!r} is not an integer >= 1")
                check_record_version(record, f"audit log {path} (line {number})")  # a newer one: AuditError
            if not isinstance(record, dict) or set(record) not in (set(FIELDS), set(UNVERSIONED_FIELDS)):
                raise ValueError(f"fields {sorted(record) if isinstance(record, dict) else type(record).__name__}")
        except ValueError as err:
            result.damage.append(Damage("edited", number, None, f"not a well-formed record ({err})"))
            continue
        parsed.append((number, line, record))
    return parsed


def verify_log(path: str | Path, public_key: str | None = None) -> Verification:
    """Check a log; ``public_key`` (base64) is the writer's trusted key, else the key the log's first record names."""
    path = Path(path)
    result = Verification(path, public_key, key_source="given" if public_key else "")
    parsed = _parse(path, result)
    result.records = [record for _, _, record in parsed]
    if not parsed:
        result.damage.append(Damage("truncated", 1, None, "the log holds no record"))
        return result
    if public_key is None:
        public_key = str(parsed[0][2].get("data", {}).get("public_key", ""))
        result.public_key, result.key_source = public_key, "named by the log itself; pass --pubkey to check authorship"
    try:
        key = _load_public(public_key)
    except ValueError:
        result.damage.append(Damage("wrong key", parsed[0][0], 0, "no usable public key (pass --pubkey)"))
        return result
    genuine = [_signature_ok(record, key) for _, _, record in parsed]
    if not any(genuine):
        result.damage.append(Damage("wrong key", parsed[0][0], parsed[0][2].get("seq"),
                                    f"no record verifies under key {key_id(public_key)}; the log was signed by "
                                    f"key {parsed[0][2].get('key_id')}"))
        return result
    _walk(parsed, genuine, result)
    _check_complete(parsed, result)
    result.damage += epsilon_decreases([(number, record) for (number, _, record), ok in zip(parsed, genuine,
                                                                                          strict=True) if ok])
    result.damage.sort(key=lambda d: d.line)
    return result


def _epsilon(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _observations(record: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(site, ε, where) that a record reports: a coordinator's round or run-end record, or a site's release."""
    data, kind = record.get("data"), record.get("kind")
    if not isinstance(data, dict):
        return []
    if kind == "release":  # a site's own log: its cumulative ε after the release, in any run
        eps = _epsilon(data.get("epsilon"))
        site = str(record.get("writer", "")).removeprefix("site:")
        where = f"run {data.get('run')!r} round {data.get('round')}"
        return [(site, eps, where)] if eps is not None else []
    if kind == "round" or kind == "run-end":
        epsilons = data.get("site_epsilon")
        where = f"round {data.get('round')}" if kind == "round" else "the run-end record"
        if isinstance(epsilons, dict):
            return [(str(site), eps, where) for site, value in epsilons.items()
                    if (eps := _epsilon(value)) is not None]
    return []


def epsilon_decreases(records: list[tuple[int, dict[str, Any]]]) -> list[Damage]:
    """``epsilon decreased`` for every record (line, record) that reports a site's ε below the largest ε an earlier
    record reported for that site: a site's cumulative ε never goes down."""
    highest: dict[str, tuple[float, str, int]] = {}
    found = []
    for number, record in records:
        for site, eps, where in _observations(record):
            before = highest.get(site)
            if before is not None and eps < before[0] * (1.0 - EPSILON_TOLERANCE):
                seq = record.get("seq")
                found.append(Damage(EPSILON_DECREASED, number, seq if isinstance(seq, int) else None,
                                    f"site {site}'s ε {eps:.6g} at {where} is below its ε {before[0]:.6g} at "
                                    f"{before[1]} (line {before[2]}): its privacy ledger was reset, cut or edited, "
                                    "and the privacy it has spent is under-reported"))
            elif before is None or eps > before[0]:
                highest[site] = (eps, where, number)
    return found


def _walk(parsed: list[tuple[int, bytes, dict[str, Any]]], genuine: list[bool], result: Verification) -> None:
    all_seqs = [record.get("seq") for _, _, record in parsed]
    seen_lines: dict[bytes, int] = {}
    expected, prev_hash, prev_time = 0, GENESIS, ""
    for position, ((number, line, record), ok) in enumerate(zip(parsed, genuine, strict=True)):
        seq = record.get("seq")
        damage = _classify(record, ok, seq=seq, expected=expected, prev_hash=prev_hash, repeated=line in seen_lines,
                           later_seqs=all_seqs[position + 1:])
        if damage is None and str(record["time"]) < prev_time:
            damage = ("timestamp", f"time {record['time']} is before the previous record's {prev_time}")
        if damage is not None:
            result.damage.append(Damage(damage[0], number, seq if isinstance(seq, int) else None, damage[1]))
            return  # later findings follow from the first; the first bad record is what matters
        seen_lines[line] = number
        assert isinstance(seq, int)  # _classify reports a record without an integer seq as damage (returned above)
        expected, prev_hash, prev_time = seq + 1, line_hash(line), str(record["time"])


def _classify(record: dict[str, Any], genuine: bool, *, seq: Any, expected: int, prev_hash: str, repeated: bool,
              later_seqs: list[Any]) -> tuple[str, str] | None:
    if not genuine:
        return "edited", "the record's signature does not match its content (changed after it was signed)"
    if repeated:
        return "inserted", f"a second copy of an earlier record (seq {seq}) was inserted here"
    if seq != expected:
        if isinstance(seq, int) and seq > expected and expected in later_seqs:
            return "reordered", f"seq {seq} comes where seq {expected} should; seq {expected} appears later"
        if isinstance(seq, int) and seq > expected:
            return "deleted", f"records with seq {expected}..{seq - 1} are missing"
        return "reordered", f"seq {seq} comes after seq {expected - 1}"
    if record.get("prev") != prev_hash:
        return "edited", "its 'prev' hash does not match the line before it (an earlier line was changed)"
    return None


def _check_complete(parsed: list[tuple[int, bytes, dict[str, Any]]], result: Verification) -> None:
    if result.damage:
        return
    number, _, last = parsed[-1]
    if parsed[0][2].get("kind") == "run-start" and last.get("kind") not in END_KINDS:
        result.damage.append(Damage("truncated", number, last.get("seq"),
                                    f"the log ends with a '{last.get('kind')}' record, not a run-end record: records "
                                    "were cut off the end, or the run has not finished"))
