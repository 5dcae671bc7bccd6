"""The report's blocks written as one self-contained HTML file, or as Markdown with the plots as PNG files beside it.

Every string from the log is evidence, not markup: it is escaped before it is written. The HTML has inline CSS,
plots embedded as base64 PNG, and a Content-Security-Policy that forbids any network fetch.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from fedpeft.audit.report_model import Image, Section, Text, fmt

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;padding:0 1em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.banner{padding:.8em 1em;font-weight:bold;border-radius:4px}.ok{background:#d8f3dc}
.unchecked{background:#ffe082}.damaged{background:#c62828;color:#fff}
.outcome{padding:.6em 1em;border-left:6px solid #2e7d32;background:#f1f8e9;font-size:15px}
.outcome.partial{border-left-color:#f9a825;background:#fff8e1}
.outcome.none{border-left-color:#c62828;background:#ffebee;font-weight:bold}p.note{background:#e3f2fd;padding:.5em}
small.site-index{color:#666;font-size:11px;margin-left:.4em}
td.trained{background:#4caf50;color:#fff}th.resumed{background:#bbdefb}
td.refused{background:#e53935;color:#fff}td.dropped{background:#fb8c00;color:#fff}td.sampled{background:#fff59d}
td.not-sampled{background:#eee;color:#888}code{font-size:12px;word-break:break-all}img{max-width:100%}"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html_cell(value: Any, tag: str) -> str:
    cell = value if isinstance(value, Text) else Text(fmt(value))
    attrs = (f' class="{html.escape(cell.css)}"' if cell.css else "") + (
        f' title="{html.escape(cell.title)}"' if cell.title else "")
    text = html.escape(cell.text)
    note = f'<small class="site-index">{html.escape(cell.note)}</small>' if cell.note else ""
    return f"<{tag}{attrs}>" + (f"<code>{text}</code>" if cell.css == "code" else text) + note + f"</{tag}>"


def _html_block(block: Any, element_id: str = "") -> str:
    if isinstance(block, Text):
        attrs = (f' id="{element_id}"' if element_id else "") + (
            f' class="{html.escape(block.css)}"' if block.css else "")
        return f"<p{attrs}>{html.escape(block.text)}</p>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
    head = "" if block.css == "kv" else "<thead><tr>" + "".join(_html_cell(h, "th") for h in block.head) + \
        "</tr></thead>"
    body = "".join("<tr>" + "".join(_html_cell(v, "td") for v in row) + "</tr>" for row in block.rows)
    return f'<table class="{html.escape(block.css)}">{head}<tbody>{body}</tbody></table>'


def to_html(title: str, banner: Text, outcome: Text, sections: list[Section]) -> str:
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>')
    parts = [head, f"<h1>{html.escape(title)}</h1>", f'<div id="banner">{_html_block(banner)}</div>',
             _html_block(outcome, "outcome")]
    for section in sections:
        parts.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>'
                     + "\n".join(_html_block(b) for b in section.blocks) + "</section>")
    return "\n".join(parts) + "\n</body></html>\n"


def _md_text(value: Any) -> str:
    if isinstance(value, Text):
        text = value.text + (f" ({value.note})" if value.note else "") + (f" ({value.title})" if value.title and
                                                                         value.css != "site" else "")
    else:
        text = fmt(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Any, out_path: Path) -> str:
    if isinstance(block, Text):
        text = _md_text(block.text).strip()
        return f"**{text}**" if "damaged" in block.css or "none" in block.css.split() else text
    if isinstance(block, Image):
        png = out_path.with_name(f"{out_path.stem}-{block.alt.split()[0]}.png")
        png.write_bytes(block.png)
        return f"![{block.alt}]({png.name})"
    head = block.head if block.css != "kv" else ["", ""]
    lines = ["| " + " | ".join(_md_text(h) for h in head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(_md_text(v) for v in row) + " |" for row in block.rows])


def to_md(title: str, banner: Text, outcome: Text, sections: list[Section], *, out_path: Path) -> str:
    mark = "> " if "ok" in banner.css.split() else "> **⚠** "
    parts = [f"# {_md_text(title)}", mark + _md_block(banner, out_path),
             "**Outcome:** " + _md_block(outcome, out_path)]
    for section in sections:
        parts.append(f'<a id="{section.id}"></a>\n\n## {section.title}')
        parts += [_md_block(block, out_path) for block in section.blocks]
    return "\n\n".join(parts) + "\n"
