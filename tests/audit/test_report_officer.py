"""The report as a compliance officer reads it: sites by name, what left each site per round, each site's log checked
under the site's own key with a three-level banner (green only when every authorship was checked), an outcome line
that never lets a run without a model open as a success, a glossary, ε lines that keep equal sites apart, and the
same in the DOM a headless Chromium renders. Every log here is a real signed log (tests/audit/report_run.py)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from fedpeft.audit.keys import load_public_key
from fedpeft.audit.report import SiteLog, render_report, write_report
from fedpeft.audit.report_plot import series_styles
from fedpeft.cli import main as cli_main
from tests.audit.report_run import SITES, SmallRun, build, digest


class Page(HTMLParser):
    """The banner and the outcome line (class, text), the site cells and the upload table's rows (text, title)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.banner = self.outcome = ("", "")
        self.site_cells: list[tuple[str, str]] = []  # (text, title), the small index label included in the text
        self.uploads: list[list[tuple[str, str]]] = []
        self._stack: list[tuple[str, dict[str, str]]] = []
        self._table, self._cell, self._text = "", None, ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self._stack.append((tag, a))
        if tag == "table":
            self._table = a.get("class", "")
        elif tag == "tr" and self._table == "uploads":
            self.uploads.append([])
        if tag in ("td", "th", "p"):
            self._cell, self._text = a, ""

    def handle_endtag(self, tag):
        opened = self._stack.pop()[1] if self._stack else {}
        if tag == "table":
            self._table = ""
        if tag not in ("td", "th", "p") or self._cell is None:
            return
        css, text = opened.get("class", ""), " ".join(self._text.split())
        if tag == "p" and "banner" in css:
            self.banner = (css, text)
        elif tag == "p" and opened.get("id") == "outcome":
            self.outcome = (css, text)
        elif "site" in css.split():
            self.site_cells.append((text, opened.get("title", "")))
        if tag == "td" and self._table == "uploads":
            self.uploads[-1].append((text, opened.get("title", "")))
        self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._text += data + " "


def _keys(run: SmallRun, sites=SITES) -> list[SiteLog]:
    return [SiteLog(run.site_logs[s], load_public_key(run.site_pubs[s])) for s in sites]


@pytest.fixture
def small(tmp_path) -> SmallRun:
    return build(tmp_path)


def test_sites_are_named_with_their_index_and_unnamed_ones_fall_back(small, tmp_path):
    page = Page(render_report(small.coordinator, tmp_path / "r.html", site_logs=_keys(small)).read_text())
    shown = set(page.site_cells)
    assert ("hospital-a site 0", "site index 0") in shown and ("bank-b site 1", "site index 1") in shown
    assert ("site 2", "site index 2") in shown, "no name in site_names: 'site <index>'"
    text = (tmp_path / "r.html").read_text()
    assert "hospital-a (site 0)" in text, "the summary and the plot legend name the index too"
    assert "Site log of hospital-a (site 0): " in text and "Site log of site 2: " in text


def test_what_left_each_site_lists_bytes_and_sha256_per_round(small, tmp_path):
    page = Page(render_report(small.coordinator, tmp_path / "r.html").read_text())
    rows = [[text for text, _ in row] for row in page.uploads if row]
    assert [(r[0], r[1]) for r in rows] == [("1", "hospital-a site 0"), ("1", "bank-b site 1"),
                                            ("2", "hospital-a site 0"), ("2", "bank-b site 1"), ("2", "site 2")]
    first = page.uploads[1]  # the head row has no td cells
    assert first[2][0] == "7,680 B (7.5 KiB)"
    assert first[3] == (digest("0", 1)[:12] + "…", digest("0", 1)), "a short prefix, the full SHA-256 as its title"
    assert first[4][0] == "masked vector" and rows[-1][4] == "none on record: dropped"
    text = (tmp_path / "r.html").read_text()
    assert "The coordinator saw only these masked vectors and their sum" in text


def test_the_banner_is_green_only_when_every_log_was_checked_under_a_given_key(small, tmp_path):
    coordinator_key = load_public_key(small.coordinator_pub)
    green = write_report(small.coordinator, tmp_path / "g.html", public_key=coordinator_key, site_logs=_keys(small))
    assert green.verdict.level == "ok" and not green.verdict.unchecked
    assert Page(green.path.read_text()).banner[0] == "banner ok"

    no_coordinator_key = write_report(small.coordinator, tmp_path / "a1.html", site_logs=_keys(small))
    assert no_coordinator_key.verdict.level == "unchecked"
    css, text = Page(no_coordinator_key.path.read_text()).banner
    assert css == "banner unchecked" and "authorship not checked for: the coordinator's log" in text

    one_site_unkeyed = _keys(small, SITES[:2]) + [SiteLog(small.site_logs["2"])]
    amber = write_report(small.coordinator, tmp_path / "a2.html", public_key=coordinator_key,
                         site_logs=one_site_unkeyed)
    assert amber.verdict.level == "unchecked" and amber.verdict.unchecked == (
        f"site 2's log (no key given for {small.site_logs['2']})",)

    swapped = [SiteLog(small.site_logs["0"], load_public_key(small.site_pubs["1"]))]  # bank-b's key for hospital-a
    red = write_report(small.coordinator, tmp_path / "r.html", public_key=coordinator_key, site_logs=swapped)
    css, text = Page(red.path.read_text()).banner
    assert red.verdict.level == "damaged" and css == "banner damaged"
    assert text.startswith("SITE LOG DAMAGED — hospital-a (site 0)'s own log") and "wrong key" in text


def test_a_site_contradicting_the_coordinator_turns_the_banner_red(small, tmp_path):
    lines = small.site_logs["1"].read_text().splitlines()
    site_log = tmp_path / "other" / "site-1.jsonl"  # a genuine site log of another run: its releases are missing
    site_log.parent.mkdir()
    site_log.write_text(lines[0] + "\n")
    report = write_report(small.coordinator, tmp_path / "r.html", public_key=load_public_key(small.coordinator_pub),
                          site_logs=[SiteLog(site_log, load_public_key(small.site_pubs["1"]))])
    css, text = Page(report.path.read_text()).banner
    assert report.verdict.level == "damaged" and css == "banner damaged"
    assert text.startswith("CROSS-CHECK FAILED — bank-b (site 1)'s own log") and "forged participation" in text


def test_the_outcome_line_says_what_the_run_produced(small, tmp_path):
    css, text = Page(render_report(small.coordinator, tmp_path / "r.html").read_text()).outcome
    assert css == "outcome"
    assert text == "The run finished 2 rounds; the global adapter changed in 2 of them; final accuracy 0.8."


def test_a_run_without_a_model_never_opens_with_a_verified_banner_alone(tmp_path):
    run = build(tmp_path, trained=False, rounds=3)
    report = write_report(run.coordinator, tmp_path / "r.html", public_key=load_public_key(run.coordinator_pub),
                          site_logs=_keys(run))
    page = Page(report.path.read_text())
    assert report.verdict.level == "ok", "the logs themselves are genuine"
    assert page.banner[1].endswith("The log is genuine, but the run it records produced no model.")
    css, text = page.outcome
    assert css == "outcome none"
    assert text.startswith("No round changed the global adapter: no model was produced (reasons: ")
    assert "hospital-a refused (privacy_budget) in rounds 1–3" in text
    assert "site 2 dropped (no reply within 60 s) in rounds 1–3" in text
    html = report.path.read_text()
    assert html.index('id="banner"') < html.index('id="outcome"') < html.index("<section"), "right under the banner"
    md = render_report(run.coordinator, tmp_path / "r.md", fmt="md").read_text()
    assert "**Outcome:** **No round changed the global adapter" in md.split("## Run summary")[0]


def test_the_glossary_explains_the_terms(small, tmp_path):
    text = render_report(small.coordinator, tmp_path / "r.html").read_text()
    glossary = text.split('<section id="glossary">')[1]
    for term in ("ε (epsilon)", "δ (delta)", "decoded", "aggregate update norm", "refused", "dropped"):
        assert f"<td>{term}</td>" in glossary, term
    assert "reconstruct only the sum" in glossary


def test_sites_with_the_same_epsilon_get_distinct_styles_and_offsets():
    for count in (2, 3, 10, 20):
        styles = series_styles(count)
        assert len({(s.marker, s.linestyle) for s in styles}) == count, count
        offsets = [s.x_offset for s in styles]
        assert len(set(offsets)) == count and max(offsets) - min(offsets) <= 0.3 + 1e-9
    assert series_styles(1)[0].x_offset == 0.0, "a single series is drawn where it is"


def test_the_command_takes_each_sites_key_after_a_colon(small, tmp_path, capsys):
    base = ["audit", "report", str(small.coordinator), "--pubkey", str(small.coordinator_pub)]
    keyed = [arg for s in SITES for arg in ("--site-log", f"{small.site_logs[s]}:{small.site_pubs[s]}")]
    assert cli_main([*base, *keyed, "--out", str(tmp_path / "g.html")]) == 0
    assert "authorship not checked" not in capsys.readouterr().err
    assert 'class="banner ok"' in (tmp_path / "g.html").read_text()

    b64 = load_public_key(small.site_pubs["0"])  # the key as base64 text works too
    assert cli_main([*base, "--site-log", f"{small.site_logs['0']}:{b64}", "--site-log", str(small.site_logs["1"]),
                     "--out", str(tmp_path / "a.html")]) == 0, "amber is not a failure: the chain is intact"
    assert "authorship not checked for: bank-b (site 1)'s log" in capsys.readouterr().err

    wrong = f"{small.site_logs['0']}:{small.site_pubs['1']}"
    assert cli_main([*base, "--site-log", wrong, "--out", str(tmp_path / "r.html")]) == 1
    assert "wrong key" in capsys.readouterr().err
    assert cli_main([*base, "--site-log", f"{small.site_logs['0']}:{tmp_path / 'no.pub'}",
                     "--out", str(tmp_path / "x.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_headless_chromium_shows_the_officers_report(small, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (shutil.which('chromium') is None): the rendered-DOM check needs it")
    report = render_report(small.coordinator, tmp_path / "report.html", site_logs=[small.site_logs["0"]])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dumped = subprocess.run([chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                            timeout=120, check=True).stdout
    page = Page(dumped)
    css, banner = page.banner
    assert css == "banner unchecked", dumped[:500]
    assert "authorship not checked for: the coordinator's log" in banner and "hospital-a (site 0)'s log" in banner
    assert page.outcome == ("outcome", "The run finished 2 rounds; the global adapter changed in 2 of them; final "
                                       "accuracy 0.8.")
    assert {"hospital-a site 0", "bank-b site 1", "site 2"} <= {text for text, _ in page.site_cells}
    assert len([row for row in page.uploads if row]) == 5 and page.uploads[1][3][1] == digest("0", 1)
    assert '<section id="glossary">' in dumped and "aggregate update norm" in dumped
