from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest

from fedpeft.errors import LedgerCorrupted, PrivacyBudgetExceeded, PrivacyError
from fedpeft.privacy.accounting import SkellamRelease, epsilon, history_epsilon
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
    from fedpeft.privacy.ledger import GAUSSIAN_SCHEMA_VERSION, SCHEMA_VERSION

    # Version 2 added distributed-DP (Skellam) lines; a Gaussian line is still written as version 1, with version
    # 1's fields only, so a fedpeft that predates version 2 keeps reading a Gaussian-only ledger.
    assert SCHEMA_VERSION == 2 and GAUSSIAN_SCHEMA_VERSION == 1
    assert [json.loads(line)["schema_version"] for line in _lines(three_rounds)] == [GAUSSIAN_SCHEMA_VERSION] * 3
    assert all("mechanism" not in json.loads(line) for line in _lines(three_rounds))
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
    records[2] = {**records[2], "schema_version": 3, "new_field": "x"}  # a newer writer's line, validly chained
    _write_lines(three_rounds, _rechained(records))
    before = three_rounds.read_bytes()
    with pytest.raises(LedgerCorrupted) as info:
        PrivacyLedger(three_rounds)
    message = str(info.value)
    assert f"privacy ledger {three_rounds} (line 3) was written by a newer fedpeft (schema_version 3)" in message
    assert "reads schema_version 2 and older" in message and "upgrade fedpeft" in message
    assert three_rounds.read_bytes() == before


@pytest.mark.parametrize("version", ["1", None, 0, True])
def test_a_malformed_schema_version_is_damage(three_rounds, version):
    records = [{k: v for k, v in json.loads(line).items() if k != "prev"} for line in _lines(three_rounds)]
    records[1]["schema_version"] = version
    _write_lines(three_rounds, _rechained(records))
    with pytest.raises(LedgerCorrupted, match=r"corrupted at line 2: bad value: 'schema_version' must be an integer"):
        PrivacyLedger(three_rounds)


# ---- distributed DP: Skellam lines (schema version 2) ------------------------------------------------------------

SK = {"sample_rate": 0.02, "mu": 132.0**2, "l1": 1200.0, "l2": 120.0}


def _skellam_entry(ledger: PrivacyLedger, round_: int, **overrides) -> LedgerEntry:
    """A valid Skellam line for ``round_`` (its epsilon as check() predicts it), then ``overrides`` applied."""
    release = SkellamRelease(SK["sample_rate"], SK["mu"], SK["l1"], SK["l2"], 1)
    eps = ledger.check(release, DELTA, 50.0, "rdp")
    entry = LedgerEntry(round=round_, steps=1, sample_rate=SK["sample_rate"], noise_multiplier=release.noise_multiplier,
                        max_grad_norm=1.0, epsilon=eps, delta=DELTA, accountant="rdp", mechanism="skellam",
                        mu=SK["mu"], l1=SK["l1"], l2=SK["l2"], cohort=3, scale=40.0)
    return dataclasses.replace(entry, **overrides)


def test_a_skellam_line_round_trips_with_every_field_as_version_2(three_rounds):
    ledger = PrivacyLedger(three_rounds)
    entry = _skellam_entry(ledger, 4)
    ledger.commit(entry)
    _commit_round(ledger, 5)  # a Gaussian line after it is still written as version 1
    reloaded = PrivacyLedger(three_rounds)
    assert reloaded.entries == ledger.entries
    assert reloaded.entries[3] == dataclasses.replace(entry, timestamp=reloaded.entries[3].timestamp)
    lines = [json.loads(line) for line in _lines(three_rounds)]
    assert [line["schema_version"] for line in lines] == [1, 1, 1, 2, 1]
    assert {k: lines[3][k] for k in ("mechanism", "mu", "l1", "l2", "cohort", "scale")} == {
        "mechanism": "skellam", "mu": SK["mu"], "l1": SK["l1"], "l2": SK["l2"], "cohort": 3, "scale": 40.0}
    assert all("mechanism" not in lines[i] for i in (0, 1, 2, 4))
    assert reloaded.history() == [RELEASE] * 3 + [SkellamRelease(SK["sample_rate"], SK["mu"], SK["l1"], SK["l2"], 1),
                                                  RELEASE]
    assert reloaded.entries[3].noise_multiplier == pytest.approx(132.0 / 120.0)
    # the recorded epsilons are the mixed history's, composed by RDP
    assert reloaded.epsilon_spent() == history_epsilon(reloaded.history(), DELTA, "rdp")
    assert reloaded.entries[3].epsilon == history_epsilon(reloaded.history()[:4], DELTA, "rdp")


def test_a_ledger_written_by_the_version_1_writer_still_loads(tmp_path):
    """Bytes exactly as fedpeft wrote them before distributed DP: schema_version 1 and the 11 version-1 fields."""
    fields = ("round", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "epsilon", "delta",
              "accountant", "kind", "timestamp", "run")
    records = []
    for round_ in (1, 2):
        eps = epsilon([RELEASE] * round_, DELTA, "rdp")
        values = (round_, 63, Q, 1.0, 1.0, eps, DELTA, "rdp", "example", "2025-01-01T00:00:00+00:00", "")
        records.append({"schema_version": 1, **dict(zip(fields, values, strict=True))})
    path = tmp_path / "ledger.jsonl"
    _write_lines(path, _rechained(records))
    ledger = PrivacyLedger(path)
    assert ledger.history() == [RELEASE, RELEASE] and ledger.rounds() == {1, 2}
    assert all(e.mechanism == "gaussian" and e.mu == 0.0 and e.cohort == 0 for e in ledger.entries)
    ledger.commit(_skellam_entry(ledger, 3))  # and a distributed round appends to it
    assert PrivacyLedger(path).entries == ledger.entries and path.read_bytes().startswith(
        b"".join(line + b"\n" for line in _rechained(records)))


@pytest.mark.parametrize(
    "edit",
    [
        {"mu": 4 * SK["mu"], "noise_multiplier": 2 * 132.0 / 120.0},  # more noise claimed: less epsilon
        {"l2": 60.0, "noise_multiplier": 132.0 / 60.0},
        {"l1": 1e9},
        {"cohort": 99},
        {"scale": 1.0},
    ],
)
def test_the_hash_chain_covers_the_skellam_fields(tmp_path, edit):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.commit(_skellam_entry(ledger, 1))
    _commit_round(ledger, 2)
    lines = _lines(path)
    lines[0] = json.dumps({**json.loads(lines[0]), **edit}).encode()  # still a valid line on its own
    _write_lines(path, lines)
    with pytest.raises(LedgerCorrupted, match="corrupted at line 2: its 'prev' hash does not match"):
        PrivacyLedger(path)
    lines[0] = json.dumps({**json.loads(lines[0]), "mechanism": "gaussian"}).encode()  # and an invalid one
    _write_lines(path, lines)
    with pytest.raises(LedgerCorrupted, match="corrupted at line 1: bad value: 'mu'=.* for a 'gaussian' release"):
        PrivacyLedger(path)


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"mu": 0.0, "noise_multiplier": 0.0}, "'mu'=0.0 must be a finite number > 0"),
        ({"mu": math.inf}, "'mu'=inf must be a finite number > 0"),
        ({"l2": 0.0}, "'l2'=0.0 must be a finite number > 0"),
        ({"l1": 100.0}, "'l1'=100.0 must be a finite number >= l2=120.0"),
        ({"cohort": 0}, "'cohort'=0 must be >= 1"),
        ({"scale": 0.0}, "'scale'=0.0 must be a finite number > 0"),
        ({"noise_multiplier": 1.0}, "'noise_multiplier'=1.0 must be sqrt(mu)/l2"),
        ({"mechanism": "laplace"}, "'mechanism'='laplace' must be one of ('gaussian', 'skellam')"),
        ({"mechanism": "gaussian"}, "'mu'=17424.0 must be 0.0 for a 'gaussian' release"),
    ],
)
def test_invalid_skellam_entries_are_refused(tmp_path, fields, shown):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    with pytest.raises(PrivacyError) as info:
        ledger.commit(_skellam_entry(ledger, 1, **fields))
    assert shown in str(info.value)
    assert not path.exists()


def test_a_version_1_line_cannot_carry_skellam_fields(three_rounds):
    records = [{k: v for k, v in json.loads(line).items() if k != "prev"} for line in _lines(three_rounds)]
    records[1] = {**records[1], "mechanism": "skellam", "mu": 1e4}  # claims version 1, has version 2's fields
    _write_lines(three_rounds, _rechained(records))
    with pytest.raises(LedgerCorrupted, match=r"line 2: wrong fields \(missing \[\], unexpected \['mechanism', 'mu'\]"):
        PrivacyLedger(three_rounds)


def test_a_version_2_line_needs_every_field(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    ledger.commit(_skellam_entry(ledger, 1))
    record = {k: v for k, v in json.loads(_lines(path)[0]).items() if k not in ("prev", "cohort")}
    _write_lines(path, _rechained([record]))
    with pytest.raises(LedgerCorrupted, match=r"line 1: wrong fields \(missing \['cohort'\]"):
        PrivacyLedger(path)


def test_check_of_a_skellam_release_refuses_over_budget_and_writes_nothing(three_rounds):
    ledger = PrivacyLedger(three_rounds)
    before = three_rounds.read_bytes()
    tiny = SkellamRelease(SK["sample_rate"], 1.0, SK["l1"], SK["l2"], 1)  # almost no noise
    with pytest.raises(PrivacyBudgetExceeded, match=r"1 Skellam release\(s\), total variance mu=1 .*raise the noise"):
        ledger.check(tiny, DELTA, 5.0, "rdp")
    assert three_rounds.read_bytes() == before
    with pytest.raises(PrivacyError, match="l1=1.0 is invalid"):
        ledger.check(SkellamRelease(SK["sample_rate"], 1e4, 1.0, SK["l2"], 1), DELTA, 5.0, "rdp")
