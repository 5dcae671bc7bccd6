"""The report's plain-language parts: the outcome line under the banner, what left each site, and the glossary.

They are written for a reader who knows neither differential privacy nor secure aggregation: a compliance officer
must learn from the first lines whether the run produced a model at all (a genuine log of a run that trained nothing
is still a run that trained nothing), and from the upload table exactly what each site let go of.
"""

from __future__ import annotations

from typing import Any

from fedpeft.audit.report_model import (
    Run,
    Section,
    Table,
    Text,
    as_dict,
    config,
    fmt,
    site_cell,
    site_name,
    site_order,
    sites,
)
from fedpeft.audit.report_sections import adapter_changes, refusal_rule

HASH_PREFIX = 12  # hex characters shown of a SHA-256; the full value is in the cell's title
MAX_REASONS = 8  # distinct reasons listed in the outcome line; the participation matrix has every one


def _ranges(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> "rounds 1–3, 5"."""
    parts: list[str] = []
    start = prev = rounds[0]
    for r in [*rounds[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}–{prev}" if prev > start else str(start))
        if r is not None:
            start = prev = r
    return ("rounds " if len(rounds) > 1 else "round ") + ", ".join(parts)


def _round_reasons(run: Run, data: dict[str, Any]) -> list[str]:
    """Why a round did not change the global adapter, from its record."""
    reasons = [f"{site_name(run, s)} refused ({refusal_rule(run, data, str(s))})"
               for s in sorted(as_dict(data.get("refusals")))]
    reasons += [f"{site_name(run, s)} dropped ({str(why)[:80]})" for s, why in sorted(as_dict(data.get("dropouts"))
                                                                                         .items())]
    if not data.get("sites_sampled"):
        reasons.append("no site was asked to train")
    elif data.get("sites_returned") and data.get("decoded") is False:
        reasons.append("the round's sum was not decoded, so no update was applied")
    elif not data.get("sites_returned") and not reasons:
        reasons.append("no site returned an update")
    return reasons or ["the global adapter's hash did not change"]


def _unchanged(run: Run, changed: set[int]) -> list[str]:
    """Each distinct reason a training round left the adapter unchanged, with the rounds it applies to."""
    by_reason: dict[str, list[int]] = {}
    for r in run.training_rounds:
        if r not in changed:
            for reason in _round_reasons(run, run.rounds[r]):
                by_reason.setdefault(reason, []).append(r)
    listed = [f"{reason} in {_ranges(rounds)}" for reason, rounds in by_reason.items()]
    more = len(listed) - MAX_REASONS
    return listed[:MAX_REASONS] + ([f"and {more} more (see the participation matrix)"] if more > 0 else [])


def _final_accuracy(run: Run) -> Any:
    accuracy = as_dict(run.end).get("final_accuracy")
    if accuracy is None:  # no run-end (or it has none): the last accuracy the rounds recorded
        accuracy = next((run.rounds[r].get("global_accuracy") for r in reversed(run.training_rounds)
                         if run.rounds[r].get("global_accuracy") is not None), None)
    return accuracy


def outcome(run: Run) -> Text:
    """One plain sentence on what the run produced; css "outcome none" when it produced no model."""
    rounds, changed = run.training_rounds, {r for r, _ in adapter_changes(run)}
    if not changed:
        reasons = _unchanged(run, changed) if rounds else ["no training round is on the record"]
        return Text("No round changed the global adapter: no model was produced (reasons: " + "; ".join(reasons)
                    + ").", "outcome none")
    planned = config(run, "federation").get("rounds")
    of_planned = f" of {planned} planned" if isinstance(planned, int) and planned != len(rounds) else ""
    lead = (f"The run finished {len(rounds)}{of_planned} rounds" if run.end is not None else
            f"The run has no end on the record (still running, stopped, or its log was cut); {len(rounds)}"
            f"{of_planned} rounds are recorded")
    text = (f"{lead}; the global adapter changed in {len(changed)} of them; final accuracy "
            f"{fmt(_final_accuracy(run))}.")
    if len(changed) < len(rounds):
        text += " Unchanged: " + "; ".join(_unchanged(run, changed)) + "."
    return Text(text, "outcome" if run.end is not None else "outcome partial")


def _size(value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return fmt(value)
    return f"{value:,} B" + (f" ({value / 1024:,.1f} KiB)" if value >= 1024 else "")


def _digest(value: Any) -> Text:
    text = str(value) if value else "—"
    return Text(text[:HASH_PREFIX] + "…" if len(text) > HASH_PREFIX else text, "code", text if value else "")


def _upload_rows(run: Run, r: int, secure: bool) -> list[list[Any]]:
    data = run.rounds[r]
    digests, sizes = as_dict(data.get("payload_sha256")), as_dict(data.get("payload_bytes"))
    refusals, dropouts = as_dict(data.get("refusals")), as_dict(data.get("dropouts"))
    rows = []
    for site in sorted({str(s) for s in (*digests, *refusals, *dropouts)}, key=site_order):
        if site in digests:
            what = "masked vector" if data.get("secure_aggregation", secure) else "adapter update"
            rows.append([fmt(r), site_cell(run, site), _size(sizes.get(site)), _digest(digests[site]), what])
        else:
            what = "nothing: refused" if site in refusals else "none on record: dropped"
            rows.append([fmt(r), site_cell(run, site), "—", _digest(None), what])
    return rows


def uploads(run: Run) -> Section:
    secure = bool(run.start.get("secure_aggregation"))
    rows = [row for r in run.training_rounds for row in _upload_rows(run, r, secure)]
    blocks: list[Any] = [Text(
        "What each site uploaded to the coordinator in each round, as the coordinator recorded it on arrival: its "
        "size and its SHA-256 fingerprint (the first characters; hover for the full value, or compare it with the "
        "site's own log). The upload is the only model data that left a site, and no record of its data ever did; "
        "a site's reply also carries its metrics (such as held-out accuracy and example counts), not listed here.")]
    if secure or any(run.rounds[r].get("secure_aggregation") for r in run.training_rounds):
        blocks.append(Text(
            "Secure aggregation was on: each upload is a masked vector — the site's update plus random masks that "
            "cancel only when the uploads of the round's sites are added up. The coordinator saw only these masked "
            "vectors and their sum; it never saw any single site's update.", "note"))
    if not rows:
        blocks.append(Text("No upload is on the record."))
        return Section("uploads", "What left each site", blocks)
    totals = []
    for site in sites(run):
        sent = [as_dict(run.rounds[r].get("payload_bytes")).get(site) for r in run.training_rounds
                if site in as_dict(run.rounds[r].get("payload_sha256"))]
        total = sum(size for size in sent if isinstance(size, int) and not isinstance(size, bool))
        totals.append([site_cell(run, site), str(len(sent)), _size(total) if sent else "—"])
    blocks.append(Table(["site", "rounds with an upload", "total uploaded"], totals, "upload-totals"))
    blocks.append(Table(["round", "site", "bytes", "SHA-256", "what it was"], rows, "uploads"))
    return Section("uploads", "What left each site", blocks)


GLOSSARY = (
    ("ε (epsilon)", "How much a site's records could show through everything the site released, under differential "
     "privacy: smaller is more private, 0 would mean nothing at all. It adds up round after round and never goes "
     "down. Each site has a budget (the target ε); a site refuses to train once another round would take it past "
     "its budget."),
    ("δ (delta)", "The small probability that the ε guarantee does not hold; it is set far below one in the number "
     "of records (for example 1e-5)."),
    ("decoded", "Under secure aggregation the coordinator can reconstruct only the sum of the round's uploads, never "
     "one site's update. “Decoded: yes” means that sum was reconstructed and applied; “no” means the round changed "
     "nothing (too few sites stayed to unmask it, or the sum failed an integrity check). Without secure aggregation "
     "it says whether the round's updates were combined and applied."),
    ("aggregate update norm", "The size (Euclidean length) of the change that the round's combined update made to "
     "the shared adapter: one number for the whole round, never one site's. Empty or zero means the adapter did not "
     "change; a sudden jump is worth a question."),
    ("refused", "The site was asked to train and declined under its own rules (its privacy budget is spent, or the "
     "run asked for something its policy forbids). Nothing left the site; the rule is named."),
    ("dropped", "The site was asked to train but no usable reply arrived (a timeout, a lost connection, or a reply "
     "that failed the coordinator's checks); nothing from it was used in that round."),
    ("SHA-256", "A fingerprint of a file or an upload: any change to the content changes it, and it reveals nothing "
     "of the content. Equal fingerprints in two logs mean the same bytes."),
)


def glossary() -> Section:
    return Section("glossary", "Glossary", [Table(["term", "meaning"], [list(row) for row in GLOSSARY], "glossary")])
