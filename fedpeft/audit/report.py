"""A human-readable report of a run from the coordinator's audit log: summary, participation, ε, metrics, lineage.

The log is verified first and the result heads the report (a red banner names the first damage; whatever records
still parse are shown anyway). Every string from the log is evidence, not markup: it is escaped before it is
written. The HTML report is one self-contained file (inline CSS, plots embedded as base64 PNG, a Content-Security-
Policy that forbids any network fetch).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.audit.verify import EPSILON_DECREASED, Verification, epsilon_decreases, verify_log
from fedpeft.errors import AuditError

if TYPE_CHECKING:
    from fedpeft.audit.crosscheck import CrossCheck

FORMATS = ("html", "md")
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;padding:0 1em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.banner{padding:.8em 1em;font-weight:bold;border-radius:4px}.ok{background:#d8f3dc}
.damaged{background:#c62828;color:#fff}td.trained{background:#4caf50;color:#fff}th.resumed{background:#bbdefb}
td.refused{background:#e53935;color:#fff}td.dropped{background:#fb8c00;color:#fff}td.sampled{background:#fff59d}
td.not-sampled{background:#eee;color:#888}code{font-size:12px;word-break:break-all}img{max-width:100%}"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class Text:
    """A paragraph (as a block of a section) or a table cell; ``css`` is its class, ``title`` its tooltip."""

    text: str
    css: str = ""
    title: str = ""


@dataclass
class Table:
    head: Sequence[str | Text]
    rows: list[list[Any]]
    css: str = ""


@dataclass
class Image:
    alt: str  # its first word names the PNG file next to a Markdown report
    png: bytes


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


@dataclass
class Run:
    start: dict[str, Any] = field(default_factory=dict)
    start_time: str = ""
    end: dict[str, Any] | None = None
    end_time: str = ""
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)  # the last record of a round wins (redone)
    resumes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)


def render_report(log_path: str | Path, out_path: str | Path, *, fmt: str = "html", public_key: str | None = None,
                  site_logs: Sequence[str | Path] = ()) -> Path:
    """Verify the coordinator log at ``log_path`` and write its report to ``out_path``; returns ``out_path``.

    ``fmt="html"``: one self-contained file. ``fmt="md"``: the same content as Markdown (pipe tables); the plots
    are written as PNG files next to the ``.md`` file (``<stem>-epsilon.png``, ``<stem>-accuracy.png``) and linked
    relatively, so keep them together. ``site_logs``: sites' own logs to verify and cross-check against this one.
    """
    if fmt not in FORMATS:
        raise AuditError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")
    log_path, out_path = Path(log_path), Path(out_path)
    if not log_path.is_file():
        raise AuditError(f"audit log {log_path} does not exist (the coordinator writes <run dir>/audit/"
                         "coordinator.jsonl)")
    try:  # the coordinator's log, and each site log given
        verification = verify_log(log_path, public_key)
        run = _collect(verification.records)
        sections = [_summary(run), _participation(run), _epsilon(run), _metrics(run), _lineage(run),
                    _verification(verification, log_path, public_key, site_logs)]
    except OSError as err:
        raise AuditError(f"an audit log cannot be read: {err}") from None
    title = f"Audit report: run {run.start.get('run', '?')}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    banner = _banner(verification)
    text = _to_html(title, banner, sections) if fmt == "html" else _to_md(title, banner, sections, out_path)
    out_path.write_text(text, encoding="utf-8")
    return out_path


def _collect(records: list[dict[str, Any]]) -> Run:
    run = Run()
    for record in records:
        kind, data, time = record.get("kind"), record.get("data"), str(record.get("time", ""))
        if not isinstance(data, dict):
            continue
        if kind == "run-start":
            run.start, run.start_time = data, time
        elif kind == "run-end":
            run.end, run.end_time = data, time
        elif kind == "run-resumed":
            run.resumes.append((time, data))
        elif kind == "refusal":
            run.refusals.append(data)
        elif kind == "round" and isinstance(data.get("round"), int):
            run.rounds[data["round"]] = data
    return run


def _banner(verification: Verification) -> Text:
    if verification.intact:
        return Text(f"Log verified: intact ({len(verification.records)} records, chain and signatures check out; "
                    f"key {verification.key_source or 'given'})", "banner ok")
    first = verification.damage[0]
    if len(verification.privacy_failures) == len(verification.damage):
        return Text(f"PRIVACY FAILURE — the log's chain and signatures verify, but a site's ε decreased: {first} "
                    f"({len(verification.damage)} record(s)). A site's ε never goes down: its privacy ledger was "
                    "reset, cut or edited, and the ε shown below under-reports what it spent.", "banner damaged")
    return Text(f"LOG DAMAGED — first damage: {first} ({len(verification.damage)} problem(s)). "
                "The records that still parse are shown below; they are not trustworthy.", "banner damaged")


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "—", True: "yes", False: "no"}[value]
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _config(run: Run, section: str) -> dict[str, Any]:
    return _dict(_dict(run.start.get("config")).get(section))


def _summary(run: Run) -> Section:
    s, dp, end = run.start, _dict(run.start.get("dp")), run.end or {}
    base, versions = _dict(s.get("base_model")), _dict(s.get("versions"))
    peft = {**_dict(s.get("peft")), **_config(run, "peft")}
    dp_text = (f"{'on' if dp.get('dp') else 'off'}; target ε {_fmt(dp.get('target_epsilon'))}, δ "
               f"{_fmt(dp.get('delta'))}, accountant {_fmt(dp.get('accountant'))}, client-level DP "
               f"{_fmt(dp.get('client_dp'))}")
    rows: list[list[Any]] = [
        ["run name", s.get("run")], ["config SHA-256", Text(_fmt(s.get("config_sha256")), "code")],
        ["library versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))],
        ["base model", f"{_fmt(base.get('name'))} (quantization {_fmt(base.get('quantization'))})"],
        ["base model fingerprint", Text(_fmt(base.get("sha256")), "code")],
        ["PEFT", f"{_fmt(peft.get('method', peft.get('peft_type')))}, rank {_fmt(peft.get('r'))}"],
        ["aggregation", f"{_fmt(s.get('aggregation'))} (weighting {_fmt(s.get('weighting'))})"],
        ["differential privacy", dp_text], ["secure aggregation", "on" if s.get("secure_aggregation") else "off"],
        ["expected sites", f"{_fmt(s.get('expected_sites'))} (at least {_fmt(s.get('min_sites'))} per round)"],
        ["started", run.start_time or "— (no run-start record)"], ["ended", run.end_time or "— (no run-end)"],
        ["rounds", _fmt(end.get("rounds", max(run.rounds, default=None)))],
        ["final accuracy", _fmt(end.get("final_accuracy"))],
    ]
    for time, data in run.resumes:
        rows.append(["coordinator restarted", f"after round {_fmt(data.get('after_round'))} at {time}"])
    return Section("summary", "Run summary", [Table(["", ""], rows, "kv")])


def _site_key(site: str) -> tuple[int, int, str]:
    return (0, int(site), site) if site.isdigit() else (1, 0, site)


def _sites(run: Run) -> list[str]:
    seen: set[str] = set()
    for data in run.rounds.values():
        for key in ("sites_sampled", "sites_returned", "sites_evaluated", "refusals", "dropouts", "site_epsilon"):
            value = data.get(key) or ()
            seen.update(str(site) for site in value)
    seen.update(str(r.get("site")) for r in run.refusals if r.get("site") is not None)
    return sorted(seen, key=_site_key)


def _rule(run: Run, server_round: int, site: str, reason: Any) -> str:
    for record in run.refusals:
        if record.get("round") == server_round and str(record.get("site")) == site and record.get("rule"):
            return str(record["rule"])
    text = str(reason)
    return text.split("rule '", 1)[1].split("'", 1)[0] if "rule '" in text else text


def _cell(run: Run, data: dict[str, Any], site: str) -> Text:
    refusals, dropouts = data.get("refusals") or {}, data.get("dropouts") or {}
    if site in (data.get("sites_returned") or ()):
        return Text("trained", "trained")
    if site in refusals:
        return Text("refused", "refused", _rule(run, data["round"], site, refusals[site]))
    if site in dropouts:
        return Text("dropped", "dropped", str(dropouts[site]))
    if site in (data.get("sites_sampled") or ()):
        return Text("sampled", "sampled")
    return Text("not sampled", "not-sampled")


def _participation(run: Run) -> Section:
    rounds = sorted(r for r in run.rounds if r >= 1)
    restarts = {int(d["after_round"]) + 1: t for t, d in run.resumes if isinstance(d.get("after_round"), int)}
    head = ["site"] + [Text(f"round {r}" + (" ↻" if r in restarts else ""), "resumed" if r in restarts else "",
                            f"coordinator restarted before this round ({restarts[r]})" if r in restarts else "")
                       for r in rounds]
    rows = [[site] + [_cell(run, run.rounds[r], site) for r in rounds] for site in _sites(run)]
    blocks: list[Any] = [Text("Each cell: trained, refused, dropped, sampled or not sampled. A refused cell's title "
                              "names the rule, a dropped cell's the reason.")]
    blocks.append(Table(head, rows, "participation") if rounds else Text("No training round was recorded."))
    if run.refusals:
        blocks.append(Text("Refusals recorded by the coordinator:"))
        blocks.append(Table(["round", "site", "rule", "reason"], [[_fmt(r.get("round")), _fmt(r.get("site")),
                            _fmt(r.get("rule")), _fmt(r.get("reason"))] for r in run.refusals], "refusals"))
    return Section("participation", "Participation", blocks)


def _line_plot(series: dict[str, list[tuple[int, float]]], ylabel: str, budget: float | None = None) -> bytes:
    """A PNG drawn on the Agg canvas directly: no pyplot, no global backend switch, no window."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 3.6), dpi=100, layout="tight")
    axes = figure.add_subplot()
    for label, points in series.items():
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if budget is not None:
        axes.axhline(budget, linestyle="--", color="black", label=f"budget ε={budget:g}")
    rounds = [p[0] for points in series.values() for p in points]
    axes.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)  # one round alone still gets a readable axis
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _epsilon(run: Run) -> Section:
    budget = _config(run, "privacy").get("target_epsilon")
    budget = float(budget) if isinstance(budget, int | float) else None
    series: dict[str, list[tuple[int, float]]] = {}
    for server_round, data in sorted(run.rounds.items()):
        for site, eps in _dict(data.get("site_epsilon")).items():
            if isinstance(eps, int | float):
                series.setdefault(str(site), []).append((server_round, float(eps)))
    if not series:
        return Section("epsilon", "Privacy spent (ε per site)", [Text("No site reported ε (DP off, or no round).")])
    series = dict(sorted(series.items(), key=lambda item: _site_key(item[0])))
    reported = _dict(_dict(run.end).get("site_epsilon"))  # the run-end's account, else the last round's
    final = {site: reported.get(site, points[-1][1]) for site, points in series.items()}
    rows = [[site, _fmt(eps), _fmt(budget), _fmt(budget - float(eps) if budget is not None else None)]
            for site, eps in final.items()]
    plot = Image("epsilon per site", _line_plot({f"site {k}": v for k, v in series.items()}, "ε", budget))
    blocks: list[Any] = [plot, Table(["site", "final ε", "budget", "left"], rows, "final-epsilon")]
    decreases = [d for d in _decreases(run) if d.kind == EPSILON_DECREASED]
    if decreases:
        blocks.append(Text("ε DECREASED — a site's ε never goes down; these records under-report it: "
                           + "; ".join(d.detail.split(" (line", 1)[0] for d in decreases), "damaged"))
    return Section("epsilon", "Privacy spent (ε per site)", blocks)


def _decreases(run: Run) -> list[Any]:
    """The ε decreases in the run's round and run-end records, in round order."""
    records: list[tuple[int, dict[str, Any]]] = [(r, {"kind": "round", "data": d})
                                                 for r, d in sorted(run.rounds.items())]
    if run.end is not None:
        records.append((max(run.rounds, default=0) + 1, {"kind": "run-end", "data": run.end}))
    return epsilon_decreases(records)


def _metrics(run: Run) -> Section:
    rows = []
    for r in sorted(run.rounds):
        d = run.rounds[r]
        client = _dict(d.get("client_dp"))
        rows.append([_fmt(r) + (" (initial evaluation)" if d.get("initial_evaluation") else ""),
                     _fmt(d.get("global_accuracy")), _fmt(d.get("aggregated_updates")),
                     _fmt(d.get("aggregate_update_norm")), _fmt(d.get("decoded")), _fmt(client.get("epsilon"))])
    head = ["round", "global accuracy", "aggregated updates", "aggregate update norm", "decoded", "client-DP ε"]
    blocks: list[Any] = [Table(head, rows, "metrics")]
    points = [(r, float(d["global_accuracy"])) for r, d in sorted(run.rounds.items())
              if isinstance(d.get("global_accuracy"), int | float)]
    if points:
        blocks.append(Image("accuracy by round", _line_plot({"global accuracy": points}, "accuracy")))
    return Section("metrics", "Metrics per round", blocks)


def _lineage(run: Run) -> Section:
    chain, last = [], None
    for r in sorted(x for x in run.rounds if x >= 1):
        sha = run.rounds[r].get("global_adapter_sha256")
        if sha and sha != last:
            chain.append([_fmt(r), Text(str(sha), "code")])
            last = sha
    blocks: list[Any] = [Table(["round", "global adapter SHA-256"], chain, "lineage") if chain
                         else Text("No round changed the global adapter.")]
    if run.end is None:
        blocks.append(Text("No run-end record: the final adapter is not on the record.", "warn"))
        return Section("lineage", "Lineage of the final adapter", blocks)
    final = run.end.get("final_adapter_sha256")
    verdict = ("equals the last round's hash" if final and final == last else "no final adapter hash recorded"
               if not final else f"DIFFERS from the last round's hash ({_fmt(last)})")
    blocks.append(Table(["", ""], [["final adapter", _fmt(run.end.get("final_adapter"))],
                                   ["final adapter SHA-256", Text(_fmt(final), "code")],
                                   ["run-end vs last round", verdict]], "kv"))
    return Section("lineage", "Lineage of the final adapter", blocks)


def _verification(verification: Verification, log_path: Path, public_key: str | None,
                  site_logs: Sequence[str | Path]) -> Section:
    blocks: list[Any] = [Text(verification.summary(), "ok" if verification.intact else "damaged")]
    if not verification.intact:
        blocks.append(Table(["kind", "line", "seq", "detail"],
                            [[d.kind, _fmt(d.line), _fmt(d.seq), d.detail] for d in verification.damage], "damage"))
    cross_check: Callable[..., CrossCheck] | None
    try:
        from fedpeft.audit.crosscheck import cross_check
    except ImportError:
        cross_check = None
    for site_log in site_logs:
        if cross_check is None:
            own = verify_log(site_log)
            blocks.append(Text(f"Site log {own.summary()} (cross-check unavailable in this version)"))
            continue
        check = cross_check(site_log, log_path, server_key=public_key)
        blocks.append(Text(f"Site log {check.site_log.summary()}", "ok" if check.site_log.intact else "damaged"))
        blocks.append(Text(check.summary(), "ok" if check.ok else "damaged"))
        if check.findings:
            blocks.append(Table(["severity", "site", "round", "kind", "detail"],
                                [[f.severity, f.site, _fmt(f.round), f.kind, f.detail] for f in check.findings],
                                "findings"))
    return Section("verification", "Verification", blocks)


def _html_cell(value: Any, tag: str) -> str:
    cell = value if isinstance(value, Text) else Text(_fmt(value))
    attrs = (f' class="{html.escape(cell.css)}"' if cell.css else "") + (
        f' title="{html.escape(cell.title)}"' if cell.title else "")
    text = html.escape(cell.text)
    return f"<{tag}{attrs}>" + (f"<code>{text}</code>" if cell.css == "code" else text) + f"</{tag}>"


def _html_block(block: Any) -> str:
    if isinstance(block, Text):
        return (f'<p class="{html.escape(block.css)}">' if block.css else "<p>") + f"{html.escape(block.text)}</p>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
    head = "" if block.css == "kv" else "<thead><tr>" + "".join(_html_cell(h, "th") for h in block.head) + \
        "</tr></thead>"
    body = "".join("<tr>" + "".join(_html_cell(v, "td") for v in row) + "</tr>" for row in block.rows)
    return f'<table class="{html.escape(block.css)}">{head}<tbody>{body}</tbody></table>'


def _to_html(title: str, banner: Text, sections: list[Section]) -> str:
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>')
    parts = [head, f"<h1>{html.escape(title)}</h1>", f'<div id="banner">{_html_block(banner)}</div>']
    for section in sections:
        parts.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>'
                     + "\n".join(_html_block(b) for b in section.blocks) + "</section>")
    return "\n".join(parts) + "\n</body></html>\n"


def _md_text(value: Any) -> str:
    text = value.text + (f" ({value.title})" if value.title else "") if isinstance(value, Text) else _fmt(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Any, out_path: Path) -> str:
    if isinstance(block, Text):
        text = _md_text(block.text).strip()
        return f"**{text}**" if "damaged" in block.css else text
    if isinstance(block, Image):
        png = out_path.with_name(f"{out_path.stem}-{block.alt.split()[0]}.png")
        png.write_bytes(block.png)
        return f"![{block.alt}]({png.name})"
    head = block.head if block.css != "kv" else ["", ""]
    lines = ["| " + " | ".join(_md_text(h) for h in head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(_md_text(v) for v in row) + " |" for row in block.rows])


def _to_md(title: str, banner: Text, sections: list[Section], out_path: Path) -> str:
    parts = [f"# {_md_text(title)}", ("> " if "ok" in banner.css else "> **⚠** ") + _md_block(banner, out_path)]
    for section in sections:
        parts.append(f'<a id="{section.id}"></a>\n\n## {section.title}')
        parts += [_md_block(block, out_path) for block in section.blocks]
    return "\n\n".join(parts) + "\n"
