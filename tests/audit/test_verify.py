"""Every kind of damage to a real run's audit log is detected and named; the cross-check catches forged records."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from fedpeft.audit.crosscheck import cross_check
from fedpeft.audit.keys import load_private_key, load_public_key
from fedpeft.audit.log import GENESIS, canonical, line_hash
from fedpeft.audit.verify import verify_log
from fedpeft.cli import main as cli_main

pytestmark = pytest.mark.slow


@pytest.fixture
def logs(audited_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(audited_run, copy)
    return copy


def _coordinator(run_dir):
    return run_dir / "audit" / "coordinator.jsonl"


def _trusted(run_dir) -> str:
    return load_public_key(run_dir / "audit" / "coordinator.pub")


def _lines(path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path, lines: list[bytes], newline_at_end: bool = True) -> None:
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))


def _edit(lines):
    record = json.loads(lines[2])
    record["data"]["global_accuracy"] = 0.99
    return [*lines[:2], canonical(record), *lines[3:]]


TAMPERS = {
    "edited": (_edit, 3),
    "deleted": (lambda lines: [*lines[:2], *lines[3:]], 3),
    "inserted": (lambda lines: [*lines[:3], lines[1], *lines[3:]], 4),
    "reordered": (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2),
    "truncated": (lambda lines: lines[:-1], None),
}


def test_an_intact_log_verifies_and_the_cli_exits_0(logs, capsys):
    verification = verify_log(_coordinator(logs), _trusted(logs))
    assert verification.intact, verification.summary()
    kinds = [r["kind"] for r in verification.records]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end" and kinds.count("round") == 3
    assert cli_main(["audit", "verify", str(_coordinator(logs)), "--pubkey",
                     str(logs / "audit" / "coordinator.pub")]) == 0
    assert "intact" in capsys.readouterr().out


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_each_tamper_is_detected_and_named(logs, kind, capsys):
    tamper, line = TAMPERS[kind]
    path = _coordinator(logs)
    original = _lines(path)
    _write(path, tamper(original))
    verification = verify_log(path, _trusted(logs))
    assert not verification.intact
    first = verification.damage[0]
    assert first.kind == kind, verification.summary()
    if line is not None:
        assert first.line == line, verification.summary()
    assert cli_main(["audit", "verify", str(path), "--pubkey", _trusted(logs)]) == 1
    assert f"{kind}: line" in capsys.readouterr().out


def test_a_torn_last_line_is_truncation(logs):
    path = _coordinator(logs)
    lines = _lines(path)
    _write(path, [*lines[:-1], lines[-1][:40]], newline_at_end=False)
    assert verify_log(path, _trusted(logs)).damage[0].kind == "truncated"


def test_another_key_is_named_wrong_key_and_a_resigned_forgery_fails_under_the_trusted_key(logs):
    site_key = load_public_key(logs / "sites" / "site-0" / "audit.pub")
    assert verify_log(_coordinator(logs), site_key).damage[0].kind == "wrong key"
    # A forger re-signs an edited record with a key of their own: the chain can be rebuilt, the signature cannot.
    forger = load_private_key(logs / "sites" / "site-0" / "audit.key")
    path = _coordinator(logs)
    lines = _edit(_lines(path))
    _write(path, _rechain(lines, {2: forger}))
    damage = verify_log(path, _trusted(logs)).damage[0]
    assert (damage.kind, damage.line) == ("edited", 3)


def _rechain(lines: list[bytes], signers: dict) -> list[bytes]:
    """Rebuild prev hashes from the first line on; re-sign the records at the given positions."""
    out, prev = [], GENESIS
    for position, line in enumerate(lines):
        record = json.loads(line)
        record["prev"] = prev
        if position in signers:
            record.pop("sig")
            record["sig"] = base64.b64encode(signers[position].sign(canonical(record))).decode()
        encoded = canonical(record)
        out.append(encoded)
        prev = line_hash(encoded)
    return out


def test_cross_check_catches_a_forged_participation_record(logs, capsys):
    path = _coordinator(logs)
    lines = _lines(path)
    records = [json.loads(line) for line in lines]
    position, site = next((i, s) for i, r in enumerate(records) if r["kind"] == "round"
                          and not r["data"].get("initial_evaluation") for s in ("0", "1", "2")
                          if s not in r["data"]["payload_sha256"])
    site_log = logs / "sites" / f"site-{site}" / "audit.jsonl"
    assert cross_check(site_log, path, server_key=_trusted(logs)).ok

    # The coordinator's operator claims the site took part (re-signing with the coordinator's own key).
    records[position]["data"]["payload_sha256"][site] = "ab" * 32
    records[position]["data"]["sites_returned"].append(site)
    coordinator_key = load_private_key(logs / "audit" / "coordinator.key")
    signers = {i: coordinator_key for i in range(position, len(records))}
    _write(path, _rechain([canonical(r) for r in records], signers))
    assert verify_log(path, _trusted(logs)).intact, "a forger with the coordinator's key keeps the log intact"
    result = cross_check(site_log, path, server_key=_trusted(logs))
    assert not result.ok
    assert any(f.kind == "forged participation" and f.round == records[position]["data"]["round"]
               for f in result.findings)
    assert cli_main(["audit", "verify", "--site", str(site_log), "--server", str(path)]) == 1
    assert "forged participation" in capsys.readouterr().out


def test_site_logs_record_what_left_and_never_the_update(logs):
    releases = []
    for site_log in sorted((logs / "sites").glob("site-*/audit.jsonl")):
        verification = verify_log(site_log)
        assert verification.intact, verification.summary()
        releases += [r["data"] for r in verification.records if r["kind"] == "release"]
        assert any(r["kind"] == "evaluation" for r in verification.records)
        assert site_log.stat().st_size < 20_000, "digests and numbers only, no tensors"
    assert len(releases) == 4, "2 rounds x 2 sampled sites"
    assert all(len(r["payload_sha256"]) == 64 and r["payload_bytes"] > 0 for r in releases)
    assert all(r["ledger_line_sha256"] and r["epsilon"] > 0 for r in releases)
