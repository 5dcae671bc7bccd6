"""The report's factual sections, each from the run's records: summary, participation, ε, metrics, lineage.

A site is shown by its display name (from the run-start record's ``site_names``) with its index as a small label,
or as "site <index>" when no name is known (report_model.site_cell).
"""

from __future__ import annotations

from typing import Any

from fedpeft.audit.report_model import (
    Image,
    Run,
    Section,
    Table,
    Text,
    as_dict,
    config,
    fmt,
    site_cell,
    site_label,
    site_order,
    sites,
)
from fedpeft.audit.report_plot import line_plot
from fedpeft.audit.verify import EPSILON_DECREASED, epsilon_decreases


def summary(run: Run) -> Section:
    s, dp, end = run.start, as_dict(run.start.get("dp")), run.end or {}
    base, versions = as_dict(s.get("base_model")), as_dict(s.get("versions"))
    peft = {**as_dict(s.get("peft")), **config(run, "peft")}
    dp_text = (f"{'on' if dp.get('dp') else 'off'}; target ε {fmt(dp.get('target_epsilon'))}, δ "
               f"{fmt(dp.get('delta'))}, accountant {fmt(dp.get('accountant'))}, client-level DP "
               f"{fmt(dp.get('client_dp'))}")
    rows: list[list[Any]] = [
        ["run name", s.get("run")], ["config SHA-256", Text(fmt(s.get("config_sha256")), "code")],
        ["library versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))],
        ["base model", f"{fmt(base.get('name'))} (quantization {fmt(base.get('quantization'))})"],
        ["base model fingerprint", Text(fmt(base.get("sha256")), "code")],
        ["PEFT", f"{fmt(peft.get('method', peft.get('peft_type')))}, rank {fmt(peft.get('r'))}"],
        ["aggregation", f"{fmt(s.get('aggregation'))} (weighting {fmt(s.get('weighting'))})"],
        ["differential privacy", dp_text], ["secure aggregation", "on" if s.get("secure_aggregation") else "off"],
        ["expected sites", f"{fmt(s.get('expected_sites'))} (at least {fmt(s.get('min_sites'))} per round)"],
        ["sites", ", ".join(site_label(run, site) for site in sites(run)) or "—"],
        ["started", run.start_time or "— (no run-start record)"], ["ended", run.end_time or "— (no run-end)"],
        ["rounds", fmt(end.get("rounds", max(run.rounds, default=None)))],
        ["final accuracy", fmt(end.get("final_accuracy"))],
    ]
    for time, data in run.resumes:
        rows.append(["coordinator restarted", f"after round {fmt(data.get('after_round'))} at {time}"])
    return Section("summary", "Run summary", [Table(["", ""], rows, "kv")])


def _rule(run: Run, server_round: int, site: str, reason: Any) -> str:
    for record in run.refusals:
        if record.get("round") == server_round and str(record.get("site")) == site and record.get("rule"):
            return str(record["rule"])
    text = str(reason)
    return text.split("rule '", 1)[1].split("'", 1)[0] if "rule '" in text else text


def refusal_rule(run: Run, data: dict[str, Any], site: str) -> str:
    """The rule a site refused under in a round (its typed refusal record, else parsed from the round's reason)."""
    return _rule(run, data.get("round", -1), site, as_dict(data.get("refusals")).get(site, ""))


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


def participation(run: Run) -> Section:
    rounds = run.training_rounds
    restarts = {int(d["after_round"]) + 1: t for t, d in run.resumes if isinstance(d.get("after_round"), int)}
    head = ["site"] + [Text(f"round {r}" + (" ↻" if r in restarts else ""), "resumed" if r in restarts else "",
                            f"coordinator restarted before this round ({restarts[r]})" if r in restarts else "")
                       for r in rounds]
    rows = [[site_cell(run, site)] + [_cell(run, run.rounds[r], site) for r in rounds] for site in sites(run)]
    blocks: list[Any] = [Text("Each cell: trained, refused, dropped, sampled or not sampled (see the glossary). A "
                              "refused cell's title names the rule, a dropped cell's the reason.")]
    blocks.append(Table(head, rows, "participation") if rounds else Text("No training round was recorded."))
    if run.refusals:
        blocks.append(Text("Refusals recorded by the coordinator:"))
        blocks.append(Table(["round", "site", "rule", "reason"], [
            [fmt(r.get("round")), site_cell(run, r.get("site")) if r.get("site") is not None else "—",
             fmt(r.get("rule")), fmt(r.get("reason"))] for r in run.refusals], "refusals"))
    return Section("participation", "Participation", blocks)


def epsilon(run: Run) -> Section:
    budget = config(run, "privacy").get("target_epsilon")
    budget = float(budget) if isinstance(budget, int | float) else None
    series: dict[str, list[tuple[int, float]]] = {}
    for server_round, data in sorted(run.rounds.items()):
        for site, eps in as_dict(data.get("site_epsilon")).items():
            if isinstance(eps, int | float):
                series.setdefault(str(site), []).append((server_round, float(eps)))
    if not series:
        return Section("epsilon", "Privacy spent (ε per site)", [Text("No site reported ε (DP off, or no round).")])
    series = dict(sorted(series.items(), key=lambda item: site_order(item[0])))
    reported = as_dict(as_dict(run.end).get("site_epsilon"))  # the run-end's account, else the last round's
    final = {site: reported.get(site, points[-1][1]) for site, points in series.items()}
    rows = [[site_cell(run, site), fmt(eps), fmt(budget), fmt(budget - float(eps) if budget is not None else None)]
            for site, eps in final.items()]
    plot = Image("epsilon per site", line_plot({site_label(run, k): v for k, v in series.items()}, "ε", budget))
    blocks: list[Any] = [plot, Text("Each site has its own marker and line style, and the lines are shifted "
                                    "sideways a little so that sites with the same ε stay visible; the table gives "
                                    "the exact values."),
                         Table(["site", "final ε", "budget", "left"], rows, "final-epsilon")]
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


def metrics(run: Run) -> Section:
    rows = []
    for r in sorted(run.rounds):
        d = run.rounds[r]
        client = as_dict(d.get("client_dp"))
        rows.append([fmt(r) + (" (initial evaluation)" if d.get("initial_evaluation") else ""),
                     fmt(d.get("global_accuracy")), fmt(d.get("aggregated_updates")),
                     fmt(d.get("aggregate_update_norm")), fmt(d.get("decoded")), fmt(client.get("epsilon"))])
    head = ["round", "global accuracy", "aggregated updates", "aggregate update norm", "decoded", "client-DP ε"]
    blocks: list[Any] = [Text("“Aggregate update norm”, “decoded” and ε are explained in the glossary."),
                         Table(head, rows, "metrics")]
    points = [(r, float(d["global_accuracy"])) for r, d in sorted(run.rounds.items())
              if isinstance(d.get("global_accuracy"), int | float)]
    if points:
        blocks.append(Image("accuracy by round", line_plot({"global accuracy": points}, "accuracy")))
    return Section("metrics", "Metrics per round", blocks)


def adapter_changes(run: Run) -> list[tuple[int, str]]:
    """(round, new global-adapter SHA-256) for each training round that changed the global adapter."""
    chain: list[tuple[int, str]] = []
    last = None
    for r in run.training_rounds:
        sha = run.rounds[r].get("global_adapter_sha256")
        if sha and sha != last:
            chain.append((r, str(sha)))
            last = sha
    return chain


def lineage(run: Run) -> Section:
    chain = adapter_changes(run)
    last = chain[-1][1] if chain else None
    blocks: list[Any] = [Table(["round", "global adapter SHA-256"], [[fmt(r), Text(sha, "code")] for r, sha in chain],
                               "lineage") if chain else Text("No round changed the global adapter.")]
    if run.end is None:
        blocks.append(Text("No run-end record: the final adapter is not on the record.", "warn"))
        return Section("lineage", "Lineage of the final adapter", blocks)
    final = run.end.get("final_adapter_sha256")
    verdict = ("equals the last round's hash" if final and final == last else "no final adapter hash recorded"
               if not final else f"DIFFERS from the last round's hash ({fmt(last)})")
    blocks.append(Table(["", ""], [["final adapter", fmt(run.end.get("final_adapter"))],
                                   ["final adapter SHA-256", Text(fmt(final), "code")],
                                   ["run-end vs last round", verdict]], "kv"))
    return Section("lineage", "Lineage of the final adapter", blocks)
