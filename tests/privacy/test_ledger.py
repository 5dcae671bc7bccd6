from __future__ import annotations

import hashlib
import json

import pytest

from fedpeft.errors import LedgerCorrupted, PrivacyBudgetExceeded, PrivacyError
from fedpeft.privacy.accounting import epsilon
from fedpeft.privacy.ledger import LedgerEntry, PrivacyLedger

DELTA = 1e-5
Q = 0.016
RELEASE = (1.0, Q, 63)


def _commit_round(ledger: PrivacyLedger, round_: int, release=RELEASE, max_epsilon: float = 50.0) -> LedgerEntry:
    eps = ledger.check(release, DELTA, max_epsilon, "rdp")
    sigma, q, steps = release
    entry = LedgerEntry(
        round=round_, steps=steps, sample_rate=q, noise_multiplier=sigma, max_grad_norm=1.0,
        epsilon=eps, delta=DELTA, accountant="rdp",
    )
    ledger.commit(entry)
    return entry


@pytest.fixture
def three_rounds(tmp_path):
    path = tmp_path / "site" / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    for round_ in (1, 2, 3):
        _commit_round(ledger, round_)
    return path


def test_missing_file_is_an_empty_ledger(tmp_path):
    ledger = PrivacyLedger(tmp_path / "none.jsonl")
    assert ledger.entries == () and ledger.history() == [] and ledger.rounds() == set()
    assert ledger.epsilon_spent() == 0.0
    assert not (tmp_path / "none.jsonl").exists()


def test_commit_and_reload_round_trip(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    _commit_round(ledger, 1)
    first_bytes = path.read_bytes()
    _commit_round(ledger, 3, release=(1.2, 0.032, 31))
    assert path.read_bytes().startswith(first_bytes)

    reloaded = PrivacyLedger(path)  # a restart: nothing is reset
    assert reloaded.entries == ledger.entries
    assert reloaded.rounds() == {1, 3}
    assert reloaded.history() == [(1.0, Q, 63), (1.2, 0.032, 31)]
    assert reloaded.epsilon_spent() == ledger.entries[-1].epsilon > ledger.entries[0].epsilon > 0
    assert all(e.timestamp.endswith("+00:00") for e in reloaded.entries)

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    assert json.loads(lines[0])["prev"] == "0" * 64
    assert json.loads(lines[1])["prev"] == hashlib.sha256(lines[0]).hexdigest()


def test_check_refuses_over_budget_and_writes_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    with pytest.raises(PrivacyBudgetExceeded, match=r"spent so far 0\b.*max_epsilon=1\b.*trains nothing this round"):
        ledger.check((1.0, Q, 625), DELTA, 1.0, "rdp")
    assert not path.exists()

    _commit_round(ledger, 1)
    before = path.read_bytes()
    spent = ledger.epsilon_spent()
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.check((1.0, Q, 625), DELTA, 2.0, "rdp")
    message = str(info.value)
    predicted = epsilon([RELEASE, (1.0, Q, 625)], DELTA, "rdp")
    assert f"spent so far {spent:.4g}" in message and f"to {predicted:.4g}" in message and "max_epsilon=2" in message
    assert path.read_bytes() == before
    assert PrivacyLedger(path).entries == ledger.entries


def test_check_predicts_the_composed_epsilon(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    _commit_round(ledger, 1, release=(1.0, Q, 300))
    predicted = ledger.check((1.0, Q, 325), DELTA, 10.0, "rdp")
    assert predicted == pytest.approx(2.7575, abs=1e-3)  # the same as 625 steps at once


def test_duplicate_or_earlier_round_is_refused(three_rounds):
    ledger = PrivacyLedger(three_rounds)
    before = three_rounds.read_bytes()
    with pytest.raises(PrivacyError, match="round 3 of run '' is already recorded"):
        ledger.commit(ledger.entries[-1])
    with pytest.raises(PrivacyError, match="round 0 is not after the last recorded round 3"):
        ledger.commit(LedgerEntry(0, 63, Q, 1.0, 1.0, 99.0, DELTA, "rdp"))
    with pytest.raises(PrivacyError, match="below"):
        ledger.commit(LedgerEntry(4, 63, Q, 1.0, 1.0, 0.5, DELTA, "rdp"))
    assert three_rounds.read_bytes() == before


def test_rounds_are_numbered_per_run_and_epsilon_still_composes(three_rounds):
    ledger = PrivacyLedger(three_rounds)
    spent = ledger.epsilon_spent()
    ledger.commit(LedgerEntry(1, 63, Q, 1.0, 1.0, spent + 1.0, DELTA, "rdp", run="second-run"))
    assert ledger.released("second-run", 1) and ledger.released("", 1) and not ledger.released("second-run", 2)
    with pytest.raises(PrivacyError, match="round 1 of run 'second-run' is already recorded"):
        ledger.commit(LedgerEntry(1, 63, Q, 1.0, 1.0, spent + 2.0, DELTA, "rdp", run="second-run"))
    with pytest.raises(PrivacyError, match="below"):
        ledger.commit(LedgerEntry(2, 63, Q, 1.0, 1.0, spent, DELTA, "rdp", run="second-run"))
    reloaded = PrivacyLedger(three_rounds)
    assert [e.run for e in reloaded.entries] == ["", "", "", "second-run"]
    assert reloaded.epsilon_spent() == spent + 1.0


def test_differing_delta_or_accountant_is_refused(three_rounds):
    ledger = PrivacyLedger(three_rounds)
    with pytest.raises(PrivacyError, match=r"delta=1e-06 differs from delta=1e-05"):
        ledger.check(RELEASE, 1e-6, 50.0, "rdp")
    with pytest.raises(PrivacyError, match=r"delta=1e-06 differs"):
        ledger.commit(LedgerEntry(4, 63, Q, 1.0, 1.0, 99.0, 1e-6, "rdp"))
    with pytest.raises(PrivacyError, match="accountant 'prv' differs from 'rdp'"):
        ledger.check(RELEASE, DELTA, 50.0, "prv")


def _lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def _write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _edit_first_epsilon(path):
    lines = _lines(path)
    record = json.loads(lines[0])
    record["epsilon"] = 0.01
    lines[0] = json.dumps(record).encode()
    _write_lines(path, lines)


def _lower_last_epsilon(path):
    lines = _lines(path)
    record = json.loads(lines[2])
    record["epsilon"] = 0.01
    lines[2] = json.dumps(record).encode()
    _write_lines(path, lines)


def _add_field(path):
    lines = _lines(path)
    record = json.loads(lines[1])
    record["note"] = "x"
    lines[1] = json.dumps(record).encode()
    _write_lines(path, lines)


@pytest.mark.parametrize(
    ("damage", "line", "kind"),
    [
        (_edit_first_epsilon, 2, "'prev' hash does not match"),
        (_lower_last_epsilon, 3, "below the previous line"),
        (lambda p: _write_lines(p, [_lines(p)[0], _lines(p)[2]]), 2, "'prev' hash does not match"),
        (lambda p: _write_lines(p, _lines(p)[1:]), 1, "'prev' hash does not match"),
        (lambda p: _write_lines(p, [_lines(p)[i] for i in (0, 2, 1)]), 2, "'prev' hash does not match"),
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), 3, "partial"),
        (lambda p: _write_lines(p, [_lines(p)[0], b"not json {", _lines(p)[2]]), 2, "not valid JSON"),
        (lambda p: _write_lines(p, [_lines(p)[0], b"[1, 2]"]), 2, "expected a JSON object"),
        (_add_field, 2, "unexpected ['note']"),
        (lambda p: p.write_bytes(p.read_bytes().replace(b'"steps": 63', b'"steps": "63"', 1)), 1, "'steps'"),
        (lambda p: p.write_bytes(b""), 1, "empty"),
    ],
)
def test_damage_is_detected_with_its_line_number(three_rounds, damage, line, kind):
    damage(three_rounds)
    damaged = three_rounds.read_bytes()
    with pytest.raises(LedgerCorrupted) as info:
        PrivacyLedger(three_rounds)
    message = str(info.value)
    assert f"{three_rounds} is corrupted at line {line}:" in message
    assert kind in message
    assert "never reset automatically" in message
    assert three_rounds.read_bytes() == damaged


def test_change_on_disk_after_load_refuses_commit(three_rounds):
    ledger = PrivacyLedger(three_rounds)
    other = PrivacyLedger(three_rounds)
    _commit_round(other, 4)
    after_other = three_rounds.read_bytes()
    with pytest.raises(LedgerCorrupted, match="changed on disk since it was loaded"):
        _commit_round(ledger, 4)
    assert three_rounds.read_bytes() == after_other


def test_zero_noise_release_is_recorded_as_infinite(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.commit(LedgerEntry(1, 10, Q, 0.0, 1.0, float("inf"), DELTA, "rdp"))
    assert PrivacyLedger(path).epsilon_spent() == float("inf")
    with pytest.raises(PrivacyBudgetExceeded):
        PrivacyLedger(path).check(RELEASE, DELTA, 1e6, "rdp")


def test_invalid_entry_is_refused_with_its_value(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    with pytest.raises(PrivacyError, match=r"'sample_rate'=1.5 must be in \(0, 1\]"):
        ledger.commit(LedgerEntry(1, 10, 1.5, 1.0, 1.0, 1.0, DELTA, "rdp"))
    with pytest.raises(PrivacyError, match="'kind'='user' must be one of"):
        ledger.commit(LedgerEntry(1, 10, Q, 1.0, 1.0, 1.0, DELTA, "rdp", kind="user"))
    assert not (tmp_path / "ledger.jsonl").exists()


def _rechained(records: list[dict]) -> list[bytes]:
    """Lines for ``records`` with a valid hash chain, as a writer of that format would have written them."""
    lines, prev = [], "0" * 64
    for record in records:
        line = json.dumps({**record, "prev": prev}).encode()
        lines.append(line)
        prev = hashlib.sha256(line).hexdigest()
    return lines


def test_every_line_records_the_schema_version(three_rounds):
    from fedpeft.privacy.ledger import SCHEMA_VERSION

    assert SCHEMA_VERSION == 1
    assert [json.loads(line)["schema_version"] for line in _lines(three_rounds)] == [SCHEMA_VERSION] * 3
    assert PrivacyLedger(three_rounds).rounds() == {1, 2, 3}


def test_a_ledger_written_before_schema_versions_loads_and_stays_chained(three_rounds):
    old = [{k: v for k, v in json.loads(line).items() if k not in ("schema_version", "prev")}
           for line in _lines(three_rounds)]
    _write_lines(three_rounds, _rechained(old))
    ledger = PrivacyLedger(three_rounds)
    assert ledger.rounds() == {1, 2, 3} and ledger.epsilon_spent() > 0
    old_bytes = three_rounds.read_bytes()
    _commit_round(ledger, 4)  # a new version appends to an old ledger: old lines untouched, the chain continues
    assert three_rounds.read_bytes().startswith(old_bytes)
    lines = _lines(three_rounds)
    assert json.loads(lines[3])["schema_version"] == 1 and "schema_version" not in json.loads(lines[2])
    assert json.loads(lines[3])["prev"] == hashlib.sha256(lines[2]).hexdigest()
    assert PrivacyLedger(three_rounds).entries == ledger.entries


def test_a_line_from_a_newer_fedpeft_is_refused_with_the_fix(three_rounds):
    records = [{k: v for k, v in json.loads(line).items() if k != "prev"} for line in _lines(three_rounds)]
    records[2] = {**records[2], "schema_version": 2, "new_field": "x"}  # a newer writer's line, validly chained
    _write_lines(three_rounds, _rechained(records))
    before = three_rounds.read_bytes()
    with pytest.raises(LedgerCorrupted) as info:
        PrivacyLedger(three_rounds)
    message = str(info.value)
    assert f"privacy ledger {three_rounds} (line 3) was written by a newer fedpeft (schema_version 2)" in message
    assert "reads schema_version 1 and older" in message and "upgrade fedpeft" in message
    assert three_rounds.read_bytes() == before


@pytest.mark.parametrize("version", ["1", None, 0, True])
def test_a_malformed_schema_version_is_damage(three_rounds, version):
    records = [{k: v for k, v in json.loads(line).items() if k != "prev"} for line in _lines(three_rounds)]
    records[1]["schema_version"] = version
    _write_lines(three_rounds, _rechained(records))
    with pytest.raises(LedgerCorrupted, match=r"corrupted at line 2: bad value: 'schema_version' must be an integer"):
        PrivacyLedger(three_rounds)
