"""A site's ε never goes down: `audit verify`, the cross-check and the report flag every record where it does (issue
#18 §1: ledgers deleted, cut or edited made the coordinator's log show 6.8 → 5.05 and every check said fine)."""

from __future__ import annotations

from fedpeft.audit.crosscheck import cross_check
from fedpeft.audit.keys import generate_key
from fedpeft.audit.log import AuditLog
from fedpeft.audit.report import render_report
from fedpeft.audit.verify import EPSILON_DECREASED, verify_log
from fedpeft.cli import main as cli_main


def _coordinator(path, rounds: list[dict[str, float]], final: dict[str, float] | None = None) -> AuditLog:
    log = AuditLog(path, generate_key(), "coordinator")
    log.append("run-start", {"public_key": log.public_key, "run": "r", "config": {"privacy": {"target_epsilon": 7.5}}})
    for number, epsilons in enumerate(rounds, start=1):
        log.append("round", {"round": number, "sites_sampled": sorted(epsilons), "sites_returned": sorted(epsilons),
                             "payload_sha256": {site: f"{site}{number}" * 8 for site in epsilons},
                             "site_epsilon": epsilons})
    log.append("run-end", {"site_epsilon": final if final is not None else rounds[-1]})
    return log


def _site(path, releases: list[tuple[str, int, float]]) -> AuditLog:
    log = AuditLog(path, generate_key(), "site:1")
    log.append("site-start", {"public_key": log.public_key, "site": "1"})
    for run, number, eps in releases:
        log.append("release", {"run": run, "round": number, "payload_sha256": f"1{number}" * 8, "payload_bytes": 1,
                               "secure_aggregation": False, "epsilon": eps, "ledger_line_sha256": "a" * 64})
    return log


def test_verify_flags_a_site_whose_epsilon_goes_down_in_the_coordinators_log(tmp_path, capsys):
    path = tmp_path / "coordinator.jsonl"
    _coordinator(path, [{"0": 6.8, "1": 7.0, "2": 7.4}, {"0": 7.3, "1": 5.05, "2": 7.44}], final={"0": 7.0})
    result = verify_log(path)
    assert not result.intact
    flagged = [(d.line, d.detail.split("'s")[0]) for d in result.damage]
    assert all(d.kind == EPSILON_DECREASED for d in result.damage)
    assert flagged == [(3, "site 1"), (4, "site 0")], "round 2's site 1, and the run-end's site 0"
    assert "5.05 at round 2 is below its ε 7 at round 1" in result.damage[0].detail
    assert "PRIVACY FAILURE" in result.summary()

    assert cli_main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PRIVACY FAILURE" in out and "epsilon decreased" in out and "site 1" in out


def test_an_increasing_epsilon_verifies(tmp_path):
    path = tmp_path / "coordinator.jsonl"
    _coordinator(path, [{"0": 1.0, "1": 2.0}, {"0": 1.5}, {"0": 1.5, "1": 2.5}])
    assert verify_log(path).intact, verify_log(path).summary()


def test_verify_flags_a_decrease_across_runs_in_a_sites_own_log(tmp_path):
    path = tmp_path / "site.jsonl"
    _site(path, [("a", 1, 3.0), ("a", 2, 6.8), ("b", 1, 1.2)])  # a new run started over from an empty ledger
    result = verify_log(path)
    assert [d.kind for d in result.damage] == [EPSILON_DECREASED]
    assert "site 1's ε 1.2 at run 'b' round 1 is below its ε 6.8 at run 'a' round 2" in result.damage[0].detail


def test_the_cross_check_flags_a_coordinator_epsilon_below_the_sites_earlier_one(tmp_path):
    site_log, server_log = tmp_path / "site.jsonl", tmp_path / "coordinator.jsonl"
    _site(site_log, [("old", 1, 6.8), ("r", 1, 6.9)])
    _coordinator(server_log, [{"1": 6.9}])
    assert cross_check(site_log, server_log).ok  # the same ε on both sides, growing: fine

    site_log, server_log = tmp_path / "site-reset.jsonl", tmp_path / "coordinator-reset.jsonl"
    _site(site_log, [("old", 1, 6.8), ("r", 1, 5.05)])
    _coordinator(server_log, [{"1": 5.05}])
    check = cross_check(site_log, server_log)
    assert not check.ok and check.server_log.intact, "the coordinator's own log cannot see the earlier run"
    kinds = [(f.kind, f.round) for f in check.findings if f.severity == "mismatch"]
    assert kinds == [("epsilon decreased", 1)]
    assert "below the ε 6.8 the site's own log recorded" in str(check.findings[0])
    assert "CROSS-CHECK FAILED" in check.summary()


def test_the_report_shows_the_decrease(tmp_path):
    path = tmp_path / "coordinator.jsonl"
    _coordinator(path, [{"0": 6.8, "1": 7.0}, {"0": 7.3, "1": 5.05}])
    text = render_report(path, tmp_path / "report.md", fmt="md").read_text()
    assert "PRIVACY FAILURE" in text and "ε DECREASED" in text
    assert "site 1's ε 5.05 at round 2 is below its ε 7 at round 1" in text
