"""A human-readable report of a run from the coordinator's audit log, for a compliance officer.

The log is verified first and the verdict heads the report: green only when every log was verified under a public
key the auditor gave (the coordinator's, and each site's own), amber when a log's chain is intact but only the key
it names itself was used (authorship not checked), red on damage (report_verdict.py). Right under the banner, one
plain sentence says what the run produced, so that a genuine log of a run that trained nothing never reads as a
success. Then: summary, participation, what left each site, ε, metrics, lineage, verification and a glossary.

Sites are shown by the display names the run-start record may carry (``site_names``: index -> name), with the index
as a small label. The modules: report_model (blocks, the run), report_sections (the factual sections),
report_plain (outcome, uploads, glossary), report_verdict (banner, verification), report_plot, report_html.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fedpeft.audit import report_sections as facts
from fedpeft.audit.report_html import to_html, to_md
from fedpeft.audit.report_model import SiteLog, collect
from fedpeft.audit.report_plain import glossary, outcome, uploads
from fedpeft.audit.report_verdict import OK, Verdict, check_sites, verdict, verification_section
from fedpeft.audit.verify import verify_log
from fedpeft.errors import AuditError

FORMATS = ("html", "md")
__all__ = ["FORMATS", "Report", "SiteLog", "render_report", "write_report"]


@dataclass(frozen=True)
class Report:
    path: Path
    verdict: Verdict  # its level: "ok", "unchecked" or "damaged"; problems and unchecked logs in words


def render_report(log_path: str | Path, out_path: str | Path, *, fmt: str = "html", public_key: str | None = None,
                  site_logs: Sequence[str | Path | SiteLog] = ()) -> Path:
    """Verify the coordinator log at ``log_path`` and write its report to ``out_path``; returns ``out_path``.
    (write_report also returns the verdict.)

    ``fmt="html"``: one self-contained file. ``fmt="md"``: the same content as Markdown (pipe tables); the plots
    are written as PNG files next to the ``.md`` file (``<stem>-epsilon.png``, ``<stem>-accuracy.png``) and linked
    relatively, so keep them together. ``site_logs``: sites' own logs to verify and cross-check against this one,
    each a path (checked against the key it names itself) or a SiteLog with the site's trusted public key.
    """
    return write_report(log_path, out_path, fmt=fmt, public_key=public_key, site_logs=site_logs).path


def write_report(log_path: str | Path, out_path: str | Path, *, fmt: str = "html", public_key: str | None = None,
                 site_logs: Sequence[str | Path | SiteLog] = ()) -> Report:
    """render_report's work, returning the written path and the banner's verdict."""
    if fmt not in FORMATS:
        raise AuditError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    log_path, out_path = Path(log_path), Path(out_path)
    if not log_path.is_file():
        raise AuditError(f"audit log {log_path} does not exist (the coordinator writes <run dir>/audit/"
                         "coordinator.jsonl)")
    given = [s if isinstance(s, SiteLog) else SiteLog(Path(s)) for s in site_logs]
    try:  # the coordinator's log, and each site log given (under its own key, when given)
        verification = verify_log(log_path, public_key)
        run = collect(verification.records)
        sites = check_sites(given, log_path, public_key)
    except OSError as err:
        raise AuditError(f"an audit log cannot be read: {err}") from None
    judged = verdict(run, verification, public_key, sites)
    sections = [facts.summary(run), facts.participation(run), uploads(run), facts.epsilon(run), facts.metrics(run),
                facts.lineage(run), verification_section(run, verification, public_key, sites), glossary()]
    title = f"Audit report: run {run.start.get('run', '?')}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    line = outcome(run)
    banner = judged.banner
    if "none" in line.css.split() and judged.level == OK:  # a genuine log of a run that trained nothing: no success
        banner = replace(banner, text=banner.text + " The log is genuine, but the run it records produced no model.")
    text = (to_html(title, banner, line, sections) if fmt == "html"
            else to_md(title, banner, line, sections, out_path=out_path))
    out_path.write_text(text, encoding="utf-8")
    return Report(out_path, judged)
