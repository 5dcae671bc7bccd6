"""Live progress of a run on the console (rich): a line per round stage and a row per finished round."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from rich.console import Console
from rich.table import Table

from fedpeft.privacy.release import score_text
from fedpeft.runs.site_names import site_label


def plain_console() -> Console:
    """A terminal gets rich's own layout; a log file or pipe gets each line whole (rich would wrap at 80 columns,
    splitting a long path, or a phrase a reader greps for, across lines)."""
    console = Console()
    return console if console.is_terminal else Console(soft_wrap=True, width=10_000)


class ConsoleProgress:
    def __init__(self, total_rounds: int, console: Console | None = None) -> None:
        self.console = console or plain_console()
        self.total_rounds = total_rounds
        self.last_said: dict[str, str] = {}  # who -> the last refusal or failure reason shown
        self.names: Mapping[str, str] = {}
        self.site_of_node: Callable[[str], str | None] = lambda node: None

    def show_names(self, names: Mapping[str, str], site_of_node: Callable[[str], str | None]) -> None:
        """Show sites by the names people know them by (index -> name), and a failed node as its site."""
        self.names, self.site_of_node = names, site_of_node

    def per_site(self, values: Mapping[str, float], digits: int) -> str:
        ordered = sorted(values.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0,
                                                          kv[0]))
        return " ".join(f"{site_label(self.names, site)}={value:.{digits}f}" for site, value in ordered)

    def node_label(self, node: str) -> str:
        site = self.site_of_node(str(node))
        return f"site {site_label(self.names, site)}" if site is not None else f"site node {node}"

    def stage(self, text: str) -> AbstractContextManager[Any]:
        if self.console.is_terminal:
            return self.console.status(text)
        self.console.print(text)
        return nullcontext()

    def start(self, run_dir: str, num_sites: int, trainable: int) -> None:
        self.console.print(f"[bold]fedpeft[/bold] run -> {run_dir}  ({num_sites} sites, {trainable:,} trainable "
                           f"values travel per client)")

    def round_done(self, record: dict[str, Any]) -> None:
        if not record.get("evaluated", True):  # between evaluations (federation.eval_every): one short line
            self.console.print(f"round {record['round']:>3}/{self.total_rounds} | "
                               f"{record.get('sites_returned', 0)}/{record.get('sites_sampled', 0)} sites | "
                               f"{record['seconds']:.1f}s", highlight=False)
            self.refusals_and_failures(record, only_new=True)
            return
        sites = self.per_site(record["site_accuracy"], 3)
        head = f"round {record['round']:>3}/{self.total_rounds} | global acc {score_text(record['global_accuracy'])}"
        if record["round"] == 0:
            line = f"{head} | untrained adapter (round 0) | {record['seconds']:.1f}s"
        else:
            loss = record.get("train_loss")
            loss_text = f"{loss:.4f}" if loss is not None else "-"
            kib = record.get("bytes_per_client") or 0
            line = (f"{head} | train loss {loss_text} | {kib / 1024:,.1f} KiB up/client | "
                    f"{record.get('sites_returned', 0)}/{record.get('sites_sampled', 0)} sites | "
                    f"{record['seconds']:.1f}s")
        self.console.print(line, highlight=False)
        self.console.print(f"            held-out acc per site: {sites}", highlight=False)
        if record.get("site_epsilon"):
            eps = self.per_site(record["site_epsilon"], 2)
            self.console.print(f"            epsilon per site (cumulative): {eps}", highlight=False)
        if record.get("client_dp_epsilon") is not None:
            self.console.print(f"            client-level epsilon: {record['client_dp_epsilon']:.2f}", highlight=False)
        self.refusals_and_failures(record, only_new=False)

    def refusals_and_failures(self, record: dict[str, Any], *, only_new: bool) -> None:
        """Each refusal and failure as it happens; between evaluations only a reason a site has not given before
        (a site refusing every round for the same reason would otherwise fill the console)."""
        lines = [(f"site {site_label(self.names, site)} refused", reason)
                 for site, reason in (record.get("refusals") or {}).items()]
        lines += [(f"{self.node_label(node)} failed", reason)
                  for node, reason in (record.get("failures") or {}).items()]
        for who, reason in lines:
            if only_new and self.last_said.get(who) == reason:
                continue
            self.last_said[who] = reason
            self.console.print(f"            [yellow]{who}:[/yellow] {reason}", highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text)

    def summary_table(self, rows: list[tuple[str, str]]) -> None:
        table = Table(title="fedpeft summary", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        for what, value in rows:
            table.add_row(what, value)
        self.console.print(table)
