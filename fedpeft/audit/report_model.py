"""The report's building blocks (paragraphs, tables, images, sections), the run as its log tells it, and how a site
is named on the page.

Blocks are plain data: report_sections.py and friends fill them from the log, report_html.py writes them as HTML or
Markdown, so every section reads the same in both formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Text:
    """A paragraph (as a block of a section) or a table cell; ``css`` is its class, ``title`` its tooltip, ``note``
    a small secondary label after the text (a named site's index)."""

    text: str
    css: str = ""
    title: str = ""
    note: str = ""


@dataclass(frozen=True)
class Table:
    head: Sequence[str | Text]
    rows: list[list[Any]]
    css: str = ""


@dataclass(frozen=True)
class Image:
    alt: str  # its first word names the PNG file next to a Markdown report
    png: bytes


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class SiteLog:
    """A site's own audit log and, when the auditor has it, the site's trusted public key (base64)."""

    path: Path
    public_key: str | None = None


@dataclass(frozen=True)
class Run:
    start: dict[str, Any] = field(default_factory=dict)
    start_time: str = ""
    end: dict[str, Any] | None = None
    end_time: str = ""
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)  # the last record of a round wins (redone)
    resumes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def site_names(self) -> dict[str, str]:
        """Site index -> display name, from the run-start record's optional ``site_names``."""
        names = self.start.get("site_names")
        if not isinstance(names, dict):
            return {}
        return {str(k): str(v) for k, v in names.items() if isinstance(v, str | int) and str(v).strip()}

    @property
    def training_rounds(self) -> list[int]:
        return sorted(r for r in self.rounds if r >= 1)


def collect(records: list[dict[str, Any]]) -> Run:
    """The run as the (parseable) records tell it; the last run-start/run-end wins, like a redone round."""
    start: dict[str, Any] = {}
    start_time, end_time, end = "", "", None
    rounds: dict[int, dict[str, Any]] = {}
    resumes: list[tuple[str, dict[str, Any]]] = []
    refusals: list[dict[str, Any]] = []
    for record in records:
        kind, data, time = record.get("kind"), record.get("data"), str(record.get("time", ""))
        if not isinstance(data, dict):
            continue
        if kind == "run-start":
            start, start_time = data, time
        elif kind == "run-end":
            end, end_time = data, time
        elif kind == "run-resumed":
            resumes.append((time, data))
        elif kind == "refusal":
            refusals.append(data)
        elif kind == "round" and isinstance(data.get("round"), int) and not isinstance(data.get("round"), bool):
            rounds[data["round"]] = data
    return Run(start, start_time, end, end_time, rounds, resumes, refusals)


def fmt(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "—", True: "yes", False: "no"}[value]
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def config(run: Run, section: str) -> dict[str, Any]:
    return as_dict(as_dict(run.start.get("config")).get(section))


def site_order(site: str) -> tuple[int, int, str]:
    return (0, int(site), site) if site.isdigit() else (1, 0, site)


def site_name(run: Run, site: Any) -> str:
    """The plain name of a site for running text: its display name, else "site <index>"."""
    return run.site_names.get(str(site)) or f"site {site}"


def site_cell(run: Run, site: Any) -> Text:
    """A site as a table cell: the name with the index as a small label (an auditor matches logs by index)."""
    site = str(site)
    name = run.site_names.get(site)
    if name is None:
        return Text(f"site {site}", "site", f"site index {site}")
    return Text(name, "site", f"site index {site}", note=f"site {site}")


def site_label(run: Run, site: Any) -> str:
    """A site in a plot legend or a sentence that must also name the index: "hospital-a (site 0)"."""
    name = run.site_names.get(str(site))
    return f"{name} (site {site})" if name else f"site {site}"


def sites(run: Run) -> list[str]:
    """Every site the log mentions (as index strings), in index order."""
    seen: set[str] = set(run.site_names)
    for data in run.rounds.values():
        for key in ("sites_sampled", "sites_returned", "sites_evaluated", "refusals", "dropouts", "site_epsilon",
                    "payload_sha256"):
            value = data.get(key) or ()
            seen.update(str(site) for site in value)
    seen.update(str(r.get("site")) for r in run.refusals if r.get("site") is not None)
    return sorted(seen, key=site_order)
