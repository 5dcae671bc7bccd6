"""A site's ledger is anchored by its own signed audit log: a ledger that is missing, cut short or edited (issue #18
§1: ε silently reset or lowered) makes the site refuse before it trains, naming the file, the mismatch and the fix.
A restart, a crash between the ledger's commit and the log's record, and a torn log tail still train as before."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fedpeft.audit.trail import SiteAudit, ledger_anchors
from fedpeft.composition import from_mapping
from fedpeft.errors import LedgerCorrupted
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.site_budget import LEDGER_RULE, SiteBudget, site_ledger_path

DELTA = 1e-5
Q, STEPS = 0.05, 20
SKELLAM = dict(sample_rate=0.02, l1=1200.0, l2=120.0, scale=30.0, cohort=3, mu=(2 * 120.0) ** 2)


def _config(tmp_path: Path, **privacy):
    return from_mapping({
        "federation": {"rounds": 10},
        "privacy": {"dp": True, "noise_multiplier": 1.0, "target_epsilon": 50.0, "delta": DELTA,
                    "accountant": "rdp", **privacy},
        "run": {"name": "first", "out_dir": str(tmp_path / "runs")},
    })


class _Site:
    """What a site does each round (client/site.py + client/app.py): plan, train, commit, log the release."""

    def __init__(self, cfg, site: str = "0") -> None:
        self.cfg, self.site = cfg, site
        self.ledger = site_ledger_path(cfg, site)
        self.log = self.ledger.parent / "audit.jsonl"

    def budget(self) -> SiteBudget:
        return SiteBudget(self.cfg, self.site, None, self.ledger, audit_log=self.log)

    def train(self, server_round: int, *, distributed: bool = False, logged: bool = True) -> float:
        audit = SiteAudit(self.log, self.ledger.parent / "audit.key", self.site)
        budget = self.budget()
        if distributed:
            spent = budget.commit_distributed(server_round, budget.plan_distributed(server_round, **SKELLAM))
        else:
            spent = budget.commit(server_round, budget.plan(server_round, Q, STEPS), STEPS)
        if logged:  # a crash between the ledger's commit and the log's record leaves it unlogged
            audit.release(self.cfg.run.name, server_round, "0" * 64, 10, secure=distributed,
                          privacy={"epsilon": spent}, ledger_line_sha256=budget.ledger.last_line_sha256())
        return spent

    def refusal(self, server_round: int, *, distributed: bool = False) -> str:
        before = self.ledger.read_bytes() if self.ledger.exists() else None
        budget = self.budget()
        with pytest.raises(LedgerCorrupted) as info:
            if distributed:
                budget.plan_distributed(server_round, **SKELLAM)
            else:
                budget.plan(server_round, Q, STEPS)
        assert info.value.rule == LEDGER_RULE
        after = self.ledger.read_bytes() if self.ledger.exists() else None
        assert after == before, "a refusal writes nothing"
        return str(info.value)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture(params=["gaussian", "skellam"])
def trained(request, tmp_path) -> _Site:
    site = _Site(_config(tmp_path))
    site.distributed = request.param == "skellam"
    for server_round in (1, 2, 3):
        site.train(server_round, distributed=site.distributed)
    return site


def test_a_deleted_ledger_is_refused_not_read_as_empty(trained):
    trained.ledger.unlink()
    message = trained.refusal(4, distributed=trained.distributed)
    assert str(trained.ledger) in message and "is missing" in message
    assert "3 release(s)" in message and str(trained.log) in message
    assert "Restore the ledger from a backup" in message and "never delete" in message
    assert not trained.ledger.exists()


def test_a_ledger_cut_short_is_refused(trained):
    _write(trained.ledger, _lines(trained.ledger)[:-1])
    message = trained.refusal(4, distributed=trained.distributed)
    assert str(trained.ledger) in message and "shorter" in message and "it holds 2 line(s)" in message
    assert "run 'first' round 3" in message and "Lines were cut off" in message
    assert "Restore the ledger from a backup" in message


def test_an_edited_last_line_is_refused(trained):
    lines = _lines(trained.ledger)
    last = json.loads(lines[-1])
    if trained.distributed:
        last["mu"] *= 4  # more noise on record: a lower epsilon from here on
        last["noise_multiplier"] *= 2
    else:
        last["noise_multiplier"] = 3.0
    _write(trained.ledger, [*lines[:-1], json.dumps(last)])
    PrivacyLedger(trained.ledger)  # its chain cannot see an edit of the last line
    message = trained.refusal(4, distributed=trained.distributed)
    assert f"{trained.ledger} line 3 (run 'first', round 3)" in message and "was edited" in message


def test_an_edit_that_lowers_epsilon_is_caught_without_an_audit_log(tmp_path):
    site = _Site(_config(tmp_path))
    for server_round in (1, 2):
        site.train(server_round)
    lines = _lines(site.ledger)
    last = json.loads(lines[-1])
    last["noise_multiplier"] = 0.7  # less noise than recorded ε accounts for: the recorded ε is too low
    _write(site.ledger, [*lines[:-1], json.dumps(last)])
    site.log.unlink()  # nothing anchors the ledger any more
    message = site.refusal(3)
    assert str(site.ledger) in message and "line 2" in message and "compose to epsilon" in message
    assert "was edited" in message


def test_a_restart_a_crash_before_the_log_and_a_torn_log_tail_still_train(tmp_path):
    site = _Site(_config(tmp_path))
    first = site.train(1)
    second = site.train(2, logged=False)  # the ledger holds a line the log does not: over-counting is safe
    with open(site.log, "ab") as handle:
        handle.write(b'{"seq": 9, "kind": "rel')  # a crash mid-append
    assert [a.round for a in ledger_anchors(site.log)] == [1]
    third = site.train(3)  # a fresh budget (a restarted site) reads the same files
    assert first < second < third
    assert [e.round for e in PrivacyLedger(site.ledger).entries] == [1, 2, 3]


def test_a_damaged_audit_log_is_refused(tmp_path):
    site = _Site(_config(tmp_path))
    for server_round in (1, 2):
        site.train(server_round)
    lines = _lines(site.log)
    _write(site.log, [lines[0], *lines[2:]])  # the first release's record removed
    message = site.refusal(3)
    assert str(site.log) in message and "is damaged" in message and "fedpeft audit verify" in message


def test_a_new_run_name_continues_the_sites_ledger(tmp_path):
    cfg = _config(tmp_path)
    site = _Site(cfg)
    spent = [site.train(r) for r in (1, 2)]
    renamed = replace(cfg, run=replace(cfg.run, name="second"))
    assert site_ledger_path(renamed, "0") == site.ledger, "the ledger is the site's, not the run's"
    again = _Site(renamed)
    assert again.budget().ledger.epsilon_spent() == spent[-1]
    assert again.train(1) > spent[-1], "round 1 of the new run composes with the first run's releases"
    assert [(e.run, e.round) for e in PrivacyLedger(site.ledger).entries] == [("first", 1), ("first", 2),
                                                                             ("second", 1)]


def test_where_a_sites_ledger_lives(tmp_path):
    cfg = _config(tmp_path)
    default = site_ledger_path(cfg, "3")
    assert default.parent.name == "site-3" and default.parent.parent.parent == tmp_path / "runs" / "sites"
    assert "first" not in str(default), "no run name in a site's ledger path"
    data = default.parent.parent.name
    assert data.startswith("synthetic-")
    for changed in ({"data": {"synthetic_examples": 999}}, {"run": {"seed": 7}}, {"federation": {"num_sites": 9}},
                    {"data": {"partitioner": "iid"}}, {"data": {"source": str(tmp_path / "rows.csv")}}):
        other = from_mapping({**{"privacy": {"dp": True}, "run": {"out_dir": str(tmp_path / "runs")}}, **changed})
        assert site_ledger_path(other, "3").parent.parent.name != data, changed
    same = from_mapping({"privacy": {"dp": True, "target_epsilon": 2.0}, "federation": {"rounds": 99},
                         "run": {"name": "x", "out_dir": str(tmp_path / "runs")}})
    assert site_ledger_path(same, "3") == default, "privacy settings, rounds and the name change no rows"
    assert site_ledger_path(from_mapping({"data": {"source": str(tmp_path / "rows.csv")}}), "0").parent.parent.name \
        .startswith("rows-")

    explicit = _config(tmp_path, ledger_dir=str(tmp_path / "ledgers"))
    assert site_ledger_path(explicit, "3") == tmp_path / "ledgers" / "site-3" / "privacy_ledger.jsonl"
    per_site = _config(tmp_path, ledger_dir=str(tmp_path / "{site}" / "own"))
    assert site_ledger_path(per_site, "3") == tmp_path / "3" / "own" / "privacy_ledger.jsonl"
    per_run = _config(tmp_path, ledger_dir=str(tmp_path / "runs" / "{run}" / "sites"))
    assert site_ledger_path(per_run, "3") == tmp_path / "runs" / "first" / "sites" / "site-3" / "privacy_ledger.jsonl"


def test_a_ledger_left_in_the_run_directory_is_not_forgotten(tmp_path):
    cfg = _config(tmp_path)
    legacy = tmp_path / "runs" / "first" / "sites" / "site-0" / "privacy_ledger.jsonl"
    old = SiteBudget(cfg, "0", None, legacy)  # what an older fedpeft wrote: the ledger inside the run directory
    old.commit(1, old.plan(1, Q, STEPS), STEPS)
    site = _Site(cfg)
    message = site.refusal(2)
    assert str(legacy) in message and f"Move {legacy} to {site.ledger}" in message
    assert "privacy.ledger_dir = " in message and "{run}" in message
    site.ledger.parent.mkdir(parents=True, exist_ok=True)
    legacy.rename(site.ledger)
    assert site.train(2) > old.ledger.epsilon_spent()
