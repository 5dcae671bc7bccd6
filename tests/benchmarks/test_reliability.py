"""Smoke test of benchmarks/reliability.py: the classifier can report a failure, and a few cheap cases run through the
battery's machinery (results file, resume, table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reliability  # noqa: E402
import reliability_cases  # noqa: E402,F401 -- registers the cases

CHEAP = ["set-without-equals", "audit-verify-missing-file", "crash-torn-jsonl-then-append"]


def _proc(rc, err="", out="", timed_out=False):
    return reliability.Proc(["fedpeft"], rc, out, err, timed_out)


def test_the_classifier_reports_each_kind_of_failure(tmp_path):
    crash = 'Traceback (most recent call last):\n  File "cli.py", line 1\nKeyError: \'round\'\n'
    assert reliability.expect_error(_proc(1, crash), "round").cls == "traceback"
    assert reliability.expect_error(_proc(0, out="done"), "round").cls == "silent-accept"
    assert reliability.expect_error(_proc(None, timed_out=True)).cls == "hang"
    assert reliability.expect_error(_proc(2, "fedpeft: error: bad input"), "federation.rounds").cls \
        == "misleading-error"
    assert reliability.expect_error(_proc(2, "fedpeft: error: 'federation.rounds' = -1"), "federation.rounds").cls \
        == "clear-error"
    kept = tmp_path / "run_config.json"
    kept.write_text("{}")
    snap = reliability.Snapshot(tmp_path)
    kept.write_text('{"overwritten": true}')
    assert reliability.expect_error(_proc(2, "fedpeft: error: run_config.json"), "run_config",
                                    unchanged=snap).cls == "data-loss"
    assert reliability.expect_raise(lambda: {}["x"], ValueError).cls == "traceback"
    assert reliability.expect_raise(lambda: None, ValueError).cls == "silent-accept"
    with pytest.raises(ValueError):
        reliability.Outcome("fine")


def test_a_case_that_crashes_counts_as_a_miss(tmp_path):
    def broken(ctx):
        return reliability.expect_error(_proc(1, 'Traceback (most recent call last):\n  File "x"\nValueError\n'))

    record = reliability.run_case(reliability.Case("fabricated", "test", broken, "a fabricated traceback"), tmp_path)
    assert record["outcome"] == "traceback" and record["miss"]
    assert "traceback  " in reliability.table([record]) and "    1" in reliability.table([record])


def test_cheap_cases_run_resume_and_print_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RELIABILITY_ROOT", str(tmp_path))  # main() sets it; put back after the test
    results = tmp_path / "results.jsonl"
    argv = ["--results", str(results), *[a for name in CHEAP for a in ("--case", name)]]
    assert reliability.main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["case"] for r in records) == sorted(CHEAP)
    assert {r["case"]: r["outcome"] for r in records} == {"set-without-equals": "clear-error",
                                                          "audit-verify-missing-file": "clear-error",
                                                          "crash-torn-jsonl-then-append": "handled"}
    assert "clear-error" in out and out.strip().splitlines()[-1].startswith("summary: 3 cases")
    assert reliability.main(argv) == 0  # a second run finds every case done and runs none
    assert "0 to run" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 3
