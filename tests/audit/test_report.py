"""The audit report of a real run: its sections, participation matrix and plots match the log, in HTML and Markdown;
damage is shown; strings from the log are escaped; and a headless Chromium renders the HTML as expected."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedpeft.audit.keys import generate_key, load_public_key
from fedpeft.audit.log import AuditLog
from fedpeft.audit.report import render_report
from fedpeft.errors import AuditError

pytestmark = pytest.mark.slow

SECTIONS = ("summary", "participation", "uploads", "epsilon", "metrics", "lineage", "verification", "glossary")
PNG = b"\x89PNG"


@pytest.fixture
def run_dir(audited_run) -> Path:
    """The audit tests' shared real run (tests/audit/conftest.py); this module only reads it."""
    return audited_run


class Dom(HTMLParser):
    """Section ids, the participation table's cells (row by row), images, and the banner's class and text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.rows: list[list[dict[str, str]]] = []
        self.images: list[dict[str, str]] = []
        self.banner, self.banner_class = "", ""
        self._table, self._cell, self._in_banner = "", None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "table":
            self._table = a.get("class", "")
        elif tag == "tr" and self._table == "participation":
            self.rows.append([])
        elif tag in ("td", "th") and self._table == "participation":
            self._cell = {"tag": tag, "class": a.get("class", ""), "title": a.get("title", ""), "text": ""}
            self.rows[-1].append(self._cell)
        elif tag == "img":
            self.images.append(a)
        elif tag == "p" and "banner" in a.get("class", ""):
            self.banner_class, self._in_banner = a["class"], True

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = ""
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "p":
            self._in_banner = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_banner:
            self.banner += data


def _coordinator(run_dir: Path) -> Path:
    return run_dir / "audit" / "coordinator.jsonl"


def _rounds(log: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["data"]["round"]: r["data"] for r in records if r["kind"] == "round" and r["data"]["round"] >= 1}


def _expected_state(data: dict, site: str) -> str:
    if site in data["sites_returned"]:
        return "trained"
    if site in data.get("refusals", {}):
        return "refused"
    if site in data.get("dropouts", {}):
        return "dropped"
    return "sampled" if site in data["sites_sampled"] else "not sampled"


def _check_participation(dom: Dom, rounds: dict[int, dict]) -> None:
    head, body = dom.rows[0], dom.rows[1:]
    assert [c["text"].split()[-1] for c in head[1:]] == [str(r) for r in sorted(rounds)]
    assert len(body) == 3, "one row per site"
    for row in body:
        site = row[0]["title"].removeprefix("site index ")  # the cell shows the site's name (or "site N")
        for cell, server_round in zip(row[1:], sorted(rounds), strict=True):
            assert cell["text"] == _expected_state(rounds[server_round], site), (site, server_round)
            assert cell["class"] == cell["text"].replace(" ", "-")
    trained = sum(c["text"] == "trained" for row in body for c in row)
    assert trained == sum(len(d["sites_returned"]) for d in rounds.values())
    assert any(c["text"] == "not sampled" for row in body for c in row), "fraction 0.67 of 3 sites leaves one out"


def test_the_html_report_matches_the_log(run_dir, tmp_path):
    out = render_report(_coordinator(run_dir), tmp_path / "report.html")
    text = out.read_text()
    dom = Dom(text)
    assert dom.sections == list(SECTIONS)
    assert "unchecked" in dom.banner_class and "authorship not checked for: the coordinator's log" in dom.banner
    _check_participation(dom, _rounds(_coordinator(run_dir)))
    assert {img["alt"] for img in dom.images} == {"epsilon per site", "accuracy by round"}
    for img in dom.images:
        prefix, _, data = img["src"].partition(",")
        assert prefix == "data:image/png;base64"
        assert base64.b64decode(data).startswith(PNG)
    assert "http://" not in text and "https://" not in text, "self-contained: nothing is fetched"
    end = json.loads(_coordinator(run_dir).read_text().splitlines()[-1])["data"]
    assert end["final_adapter_sha256"] in text and "equals the last round" in text
    assert "audited" in text and "tiny-llama" in text and "fedavg" in text
    keyed = Dom(render_report(_coordinator(run_dir), tmp_path / "keyed.html",
                              public_key=load_public_key(run_dir / "audit" / "coordinator.pub")).read_text())
    assert "ok" in keyed.banner_class.split() and "intact" in keyed.banner, "green: verified under the given key"


def test_the_markdown_report_has_the_same_content(run_dir, tmp_path):
    out = render_report(_coordinator(run_dir), tmp_path / "report.md", fmt="md")
    text = out.read_text()
    for section in SECTIONS:
        assert f'<a id="{section}"></a>' in text
    rounds = _rounds(_coordinator(run_dir))
    participation = text.split('<a id="participation">')[1].split('<a id="uploads">')[0]
    rows = [line for line in participation.splitlines() if line.startswith("| ") and "round" not in line]
    assert len(rows) == 3
    assert sum(line.count("| trained ") for line in rows) == sum(len(d["sites_returned"]) for d in rounds.values())
    for name, alt in (("epsilon", "epsilon per site"), ("accuracy", "accuracy by round")):
        assert f"![{alt}](report-{name}.png)" in text
        assert (tmp_path / f"report-{name}.png").read_bytes().startswith(PNG)


def test_a_tampered_log_is_reported_damaged_and_still_rendered(run_dir, tmp_path):
    log = tmp_path / "coordinator.jsonl"
    lines = _coordinator(run_dir).read_bytes().split(b"\n")
    target = next(i for i, line in enumerate(lines) if b'"kind":"round"' in line and b'"round":1,' in line)
    at = lines[target].index(b'"aggregated_updates":') + len(b'"aggregated_updates":')
    lines[target] = lines[target][:at] + (b"7" if lines[target][at:at + 1] != b"7" else b"8") + lines[target][at + 1:]
    log.write_bytes(b"\n".join(lines))
    dom = Dom(render_report(log, tmp_path / "damaged.html").read_text())
    assert "damaged" in dom.banner_class and "edited" in dom.banner, dom.banner
    assert dom.sections == list(SECTIONS) and dom.rows, "the records that parse are still shown"
    md = render_report(log, tmp_path / "damaged.md", fmt="md").read_text()
    assert "DAMAGED" in md and "edited" in md


def test_site_logs_are_cross_checked(run_dir, tmp_path):
    pytest.importorskip("fedpeft.audit.crosscheck")
    sites = sorted(run_dir.glob("sites/site-*/audit.jsonl"))
    assert sites
    text = render_report(_coordinator(run_dir), tmp_path / "r.html", site_logs=sites).read_text()
    verification = text.split('<section id="verification">')[1]
    assert verification.count("Site log ") == len(sites)
    assert verification.count("matches the site") == len(sites)


def test_strings_from_the_log_are_escaped_and_every_state_is_shown(tmp_path):
    log = AuditLog(tmp_path / "coordinator.jsonl", generate_key(), "coordinator")
    evil = '<script>alert("x")</script>'
    log.append("run-start", {"public_key": log.public_key, "run": evil, "config": {"privacy": {"target_epsilon": 2}}})
    log.append("round", {"round": 1, "sites_sampled": ["a", "b", "c"], "sites_returned": ["a"],
                         "refusals": {"b": f"rule 'no-{evil}' forbids it"}, "dropouts": {"c": "timeout"},
                         "site_epsilon": {"a": 1.5}, "global_adapter_sha256": "ab" * 32, "global_accuracy": 0.5})
    log.append("refusal", {"round": 1, "site": "b", "rule": f"no-{evil}", "reason": evil})
    log.append("run-resumed", {"after_round": 1})
    log.append("round", {"round": 2, "sites_sampled": ["a"], "sites_returned": [], "site_epsilon": {}})
    log.append("run-end", {"final_adapter": evil, "final_adapter_sha256": "ab" * 32, "final_accuracy": 0.5})
    text = render_report(log.path, tmp_path / "r.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text
    dom = Dom(text)
    states = {(row[0]["title"].removeprefix("site index "), i): c for row in dom.rows[1:]
              for i, c in enumerate(row[1:], start=1)}
    assert [states[(s, 1)]["text"] for s in "abc"] == ["trained", "refused", "dropped"]
    assert states[("b", 1)]["title"] == f"no-{evil}", "the refused cell's title names the rule"
    assert [states[(s, 2)]["text"] for s in "abc"] == ["sampled", "not sampled", "not sampled"]
    assert "restarted" in dom.rows[0][2]["title"] and "after round 1" in text


def test_bad_inputs_raise_audit_error(run_dir, tmp_path):
    with pytest.raises(AuditError, match="does not exist"):
        render_report(tmp_path / "missing.jsonl", tmp_path / "r.html")
    with pytest.raises(AuditError, match="unknown report format 'pdf'"):
        render_report(_coordinator(run_dir), tmp_path / "r.pdf", fmt="pdf")
    with pytest.raises(AuditError, match="cannot be read"):
        render_report(_coordinator(run_dir), tmp_path / "r.html", site_logs=[tmp_path / "no-site.jsonl"])


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return found


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_headless_chromium_renders_the_report(run_dir, tmp_path):
    chromium = _chromium()
    report = render_report(_coordinator(run_dir), tmp_path / "report.html")
    dumped = _headless(chromium, tmp_path / "profile", "--dump-dom", report.as_uri()).stdout
    dom = Dom(dumped)
    assert dom.sections == list(SECTIONS), dumped[:500]
    trained = [c for row in dom.rows[1:] for c in row if c["class"] == "trained"]
    assert len(trained) == sum(len(d["sites_returned"]) for d in _rounds(_coordinator(run_dir)).values())
    epsilon = [img for img in dom.images if img.get("alt") == "epsilon per site"]
    assert len(epsilon) == 1 and epsilon[0]["src"].startswith("data:image/png;base64,")
    shot = tmp_path / "shot.png"
    _headless(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 10_000
