"""The report's line plots, drawn on matplotlib's Agg canvas directly: no pyplot, no global backend switch, no window.

Several sites often spend exactly the same ε (the same plan, the same data size), and plain lines then lie on top of
each other so that one site seems missing. Each series therefore gets its own line style and marker, and is shifted
sideways by a small fraction of a round: the heights (the values an auditor reads) are never moved, and the exact
values are in the table beside the plot.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINE_STYLES = ("-", "--", ":", "-.")
MAX_SPREAD = 0.3  # the widest total sideways shift, in rounds: well inside the gap to the next round


@dataclass(frozen=True)
class Style:
    marker: str
    linestyle: str
    x_offset: float


def series_styles(count: int) -> list[Style]:
    """A distinct (marker, line style) pair and a distinct sideways offset for each of ``count`` series."""
    step = min(0.08, MAX_SPREAD / (count - 1)) if count > 1 else 0.0
    # markers and line styles advance together but wrap at different lengths (10 and 4): pairs repeat after 20
    return [Style(MARKERS[i % len(MARKERS)], LINE_STYLES[(i + i // len(MARKERS)) % len(LINE_STYLES)],
                  (i - (count - 1) / 2) * step) for i in range(count)]


def line_plot(series: dict[str, list[tuple[int, float]]], ylabel: str, budget: float | None = None) -> bytes:
    """A PNG of one line per series (label -> (round, value) points), with a dashed budget line when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 3.6), dpi=100, layout="tight")
    axes = figure.add_subplot()
    for (label, points), style in zip(series.items(), series_styles(len(series)), strict=True):
        axes.plot([p[0] + style.x_offset for p in points], [p[1] for p in points], marker=style.marker,
                  linestyle=style.linestyle, markersize=6, markerfacecolor="none" if len(series) > 1 else None,
                  label=label)
    if budget is not None:
        axes.axhline(budget, linestyle="--", color="black", label=f"budget ε={budget:g}")
    rounds = [p[0] for points in series.values() for p in points]
    axes.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)  # one round alone still gets a readable axis
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best", ncol=max(1, (len(series) + 11) // 12))
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
