"""The audit log writer: signed, chained, fsync'd appends; a torn tail is recovered, never silently dropped."""

from __future__ import annotations

import json
import threading

import pytest

from fedpeft.audit.keys import generate_key, load_public_key, save_private_key
from fedpeft.audit.log import GENESIS, AuditLog, line_hash, read_records
from fedpeft.audit.verify import verify_log
from fedpeft.errors import AuditError


def _log(tmp_path, key=None):
    key = key or generate_key()
    log = AuditLog(tmp_path / "a.jsonl", key, "coordinator")
    log.append("run-start", {"public_key": log.public_key, "run": "t"})
    return log


def test_records_chain_and_sign_and_verify(tmp_path):
    log = _log(tmp_path)
    for r in range(3):
        log.append("round", {"round": r})
    log.append("run-end", {})
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS and records[3]["prev"] == line_hash(lines[2])
    assert verify_log(tmp_path / "a.jsonl", log.public_key).intact


def test_a_torn_tail_is_moved_aside_and_recorded(tmp_path):
    log = _log(tmp_path)
    path = tmp_path / "a.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 1, "kind": "rou')  # the writer died mid-line
    verification = verify_log(path, log.public_key)
    assert not verification.intact and verification.damage[0].kind == "truncated"
    log.append("run-end", {})
    records = read_records(path)
    assert [r["kind"] for r in records] == ["run-start", "recovered", "run-end"]
    assert records[1]["data"]["torn_bytes"] == len(b'{"seq": 1, "kind": "rou')
    assert (tmp_path / "a.jsonl.torn").read_bytes().startswith(b'{"seq": 1')
    assert verify_log(path, log.public_key).intact


def test_concurrent_writers_append_in_turn(tmp_path):
    key = generate_key()
    log = _log(tmp_path, key)

    def write(n: int) -> None:
        writer = AuditLog(tmp_path / "a.jsonl", key, "coordinator")
        for i in range(10):
            writer.append("round", {"writer": n, "i": i})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.append("run-end", {})
    verification = verify_log(tmp_path / "a.jsonl", log.public_key)
    assert verification.intact, verification.summary()
    assert len(verification.records) == 42


def test_time_never_goes_backwards_even_if_the_clock_does(tmp_path):
    log = _log(tmp_path)
    path = tmp_path / "a.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    future = dict(first)
    # A record from the "future" (a clock that was ahead), re-signed by the writer, then a normal append.
    future.update(seq=1, time="2999-01-01T00:00:00.000000Z", kind="round", data={}, prev=line_hash(
        path.read_bytes().splitlines()[0]))
    from fedpeft.audit.log import canonical

    future.pop("sig")
    import base64

    future["sig"] = base64.b64encode(log.key.sign(canonical(future))).decode()
    with open(path, "ab") as handle:
        handle.write(canonical(future) + b"\n")
    log.append("run-end", {})
    assert read_records(path)[-1]["time"] == "2999-01-01T00:00:00.000000Z"
    assert verify_log(path, log.public_key).intact


def test_keys_round_trip_and_bad_keys_are_named(tmp_path):
    key = generate_key()
    save_private_key(key, tmp_path / "k.key")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert load_public_key(tmp_path / "k.pub") == AuditLog(tmp_path / "x", key, "w").public_key
    with pytest.raises(AuditError, match="not a base64 Ed25519 key"):
        load_public_key("not-a-key")
    (tmp_path / "a.jsonl").write_text("garbage\n")
    with pytest.raises(AuditError, match="its last line is not a record"):
        AuditLog(tmp_path / "a.jsonl", key, "w").append("x", {})


def _resigned(lines: list[bytes], key, change) -> list[bytes]:
    """The records passed through ``change``, re-chained and re-signed by ``key``, as their writer would have."""
    import base64

    from fedpeft.audit.log import canonical

    out, prev = [], GENESIS
    for line in lines:
        record = change(json.loads(line))
        record.pop("sig")
        record["prev"] = prev
        record["sig"] = base64.b64encode(key.sign(canonical(record))).decode()
        out.append(canonical(record))
        prev = line_hash(out[-1])
    return out


def _without_version(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "schema_version"}


def test_every_record_carries_the_schema_version(tmp_path):
    from fedpeft.audit.log import SCHEMA_VERSION

    log = _log(tmp_path)
    log.append("run-end", {})
    assert SCHEMA_VERSION == 1
    assert [r["schema_version"] for r in read_records(tmp_path / "a.jsonl")] == [SCHEMA_VERSION] * 2
    assert verify_log(tmp_path / "a.jsonl", log.public_key).intact


def test_a_log_written_before_schema_versions_verifies_and_can_be_continued(tmp_path):
    path = tmp_path / "site.jsonl"
    log = AuditLog(path, generate_key(), "site:0")  # a site's log: it stays open across runs (and upgrades)
    log.append("release", {"round": 0})
    log.append("release", {"round": 1})
    old = _resigned(path.read_bytes().splitlines(), log.key, _without_version)
    path.write_bytes(b"".join(line + b"\n" for line in old))
    assert all("schema_version" not in r for r in read_records(path))
    assert verify_log(path, log.public_key).intact
    log.append("release", {"round": 2})  # an upgraded writer continues the old log: old lines kept, chain unbroken
    assert path.read_bytes().startswith(b"".join(line + b"\n" for line in old))
    assert read_records(path)[-1]["schema_version"] == 1
    verification = verify_log(path, log.public_key)
    assert verification.intact, verification.summary()


def test_a_record_from_a_newer_fedpeft_is_refused_not_judged(tmp_path, capsys):
    from fedpeft.cli import main as cli_main

    log = _log(tmp_path)
    log.append("round", {"round": 0})
    path = tmp_path / "a.jsonl"
    newer = _resigned(path.read_bytes().splitlines(), log.key,
                      lambda r: {**r, "schema_version": 2, "new": 1} if r["seq"] == 1 else r)
    path.write_bytes(b"".join(line + b"\n" for line in newer))
    before = path.read_bytes()
    expected = rf"audit log {path} \(line 2\) was written by a newer fedpeft \(schema_version 2\).*upgrade fedpeft"
    with pytest.raises(AuditError, match=expected) as info:
        verify_log(path, log.public_key)
    assert "reads schema_version 1 and older" in str(info.value)
    with pytest.raises(AuditError, match=expected):
        read_records(path)
    with pytest.raises(AuditError, match=expected):
        log.append("run-end", {})  # continuing the chain needs the last record understood
    assert path.read_bytes() == before
    assert cli_main(["audit", "verify", str(path), "--pubkey", log.public_key]) == 2
    assert "upgrade fedpeft" in capsys.readouterr().err


def test_a_malformed_schema_version_is_an_edit(tmp_path):
    log = _log(tmp_path)
    log.append("round", {"round": 0})
    log.append("run-end", {})
    path = tmp_path / "a.jsonl"
    lines = path.read_bytes().splitlines()
    record = json.loads(lines[1])
    record["schema_version"] = "1"
    path.write_bytes(b"".join(line + b"\n" for line in [lines[0], json.dumps(record).encode(), lines[2]]))
    damage = verify_log(path, log.public_key).damage[0]
    assert (damage.kind, damage.line) == ("edited", 2) and "schema_version '1'" in damage.detail
