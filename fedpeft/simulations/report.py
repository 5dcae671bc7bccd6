"""The end-of-run summary a person reads: final vs round-0 accuracy vs the majority baseline, time and bytes."""

from __future__ import annotations

import json

from fedpeft.privacy.release import score_text
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.server.progress import ConsoleProgress
from fedpeft.simulations.engine import SimulationResult


def bytes_per_client(result: SimulationResult) -> float:
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    sizes = [r["bytes_per_client"] for r in rounds if r.get("bytes_per_client")]
    return sum(sizes) / len(sizes) if sizes else 0.0


def print_result(result: SimulationResult) -> None:
    summary = result.summary
    rows = [("rounds x sites", f"{summary['rounds']} x {summary['config']['federation']['num_sites']}"),
            ("wall time", f"{result.seconds:.1f} s"),
            ("upload per client per round", f"{bytes_per_client(result) / 1024:,.1f} KiB (adapter tensors only)")]
    if result.majority_baseline is not None:
        rows.append(("majority-class baseline", f"{result.majority_baseline:.3f}"))
    rows += [("round 0 (untrained adapter)", score_text(summary["initial_accuracy"])),
             ("final global accuracy", score_text(summary["final_accuracy"])),
             ("final adapter", str(summary["final_adapter"]))]
    if summary.get("site_epsilon"):
        spent = summary["site_epsilon"]
        progress = ConsoleProgress(summary["rounds"])
        progress.show_names(summary.get("site_names") or {}, lambda node: None)
        rows.append(("epsilon per site (cumulative)", progress.per_site(spent, 2)))
    if summary.get("client_dp_epsilon") is not None:
        rows.append(("client-level epsilon", f"{summary['client_dp_epsilon']:.2f}"))
    rows.append(("metrics", str(result.run_dir / METRICS_FILE)))
    ConsoleProgress(summary["rounds"]).summary_table(rows)
