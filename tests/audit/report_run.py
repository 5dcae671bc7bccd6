"""A small signed run built with the project's own audit writers: a coordinator log and each site's own log, whose
accounts agree (same payload digests and ε), with every key's public half saved as a .pub file.

Used by the report tests that need a run of a given shape (site names, secure aggregation, a run that trains
nothing) without simulating one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedpeft.audit.keys import generate_key, public_key_b64
from fedpeft.audit.log import AuditLog

NAMES = {"0": "hospital-a", "1": "bank-b"}  # site 2 has no name: the report falls back to "site 2"
SITES = ("0", "1", "2")


@dataclass(frozen=True)
class SmallRun:
    coordinator: Path
    coordinator_pub: Path
    site_logs: dict[str, Path]
    site_pubs: dict[str, Path]


def digest(site: str, server_round: int) -> str:
    return hashlib.sha256(f"upload of site {site} in round {server_round}".encode()).hexdigest()


def _pub(key, path: Path) -> Path:
    path.write_text(public_key_b64(key) + "\n", encoding="ascii")
    return path


def _round(server_round: int, *, trained: bool, epsilon: dict[str, float]) -> dict:
    returned = list(SITES[:2]) if trained else []
    refusals = {} if trained else {"0": "site policy rule 'privacy_budget': spent", "1": "rule 'privacy_budget'"}
    dropped = server_round == 2 or not trained  # the unnamed site 2 drops out of round 2 (and of every untrained one)
    return {"round": server_round, "sites_sampled": list(SITES[:2]) + (["2"] if dropped else []),
            "sites_returned": returned, "refusals": refusals,
            "dropouts": {"2": "no reply within 60 s"} if dropped else {}, "secure_aggregation": True,
            "decoded": trained, "aggregated_updates": len(returned),
            "client_dp": {"mode": "distributed", "noise_std_on_sum": 0.0, "epsilon": None},
            "aggregate_update_norm": 0.25 * server_round if trained else None,
            "site_epsilon": {s: epsilon[s] for s in returned},
            "payload_sha256": {s: digest(s, server_round) for s in returned},
            "payload_bytes": {s: 7680 for s in returned},
            "global_adapter_sha256": hashlib.sha256(f"adapter {server_round}".encode()).hexdigest() if trained
            else None, "global_accuracy": 0.4 + 0.2 * server_round if trained else None}


def build(directory: Path, *, trained: bool = True, rounds: int = 2) -> SmallRun:
    """Rounds 1..``rounds`` in which sites 0 and 1 train with the same ε (``trained``), or in which sites 0 and 1
    refuse and site 2 drops (no model)."""
    key, site_keys = generate_key(), {s: generate_key() for s in SITES}
    log = AuditLog(directory / "coordinator.jsonl", key, "coordinator")
    log.append("run-start", {"public_key": log.public_key, "run": "small", "site_names": NAMES,
                             "secure_aggregation": True, "expected_sites": 3, "min_sites": 2,
                             "config": {"privacy": {"target_epsilon": 8.0}, "federation": {"rounds": rounds}}})
    site_logs = {s: AuditLog(directory / f"site-{s}.jsonl", site_keys[s], f"site:{s}") for s in SITES}
    for s, site_log in site_logs.items():
        site_log.append("site-start", {"public_key": site_log.public_key, "site": s})
    for r in range(1, rounds + 1):
        epsilon = {s: 2.0 * r for s in SITES}  # sites 0 and 1 spend exactly the same ε
        record = _round(r, trained=trained, epsilon=epsilon)
        for s in record["sites_returned"]:
            site_logs[s].append("release", {"run": "small", "round": r, "payload_sha256": digest(s, r),
                                            "payload_bytes": 7680, "secure_aggregation": True,
                                            "epsilon": epsilon[s], "ledger_line_sha256": "a" * 64})
        for s, reason in record["refusals"].items():
            site_logs[s].append("refusal", {"run": "small", "round": r, "reason": reason})
            log.append("refusal", {"round": r, "site": s, "rule": "privacy_budget", "reason": reason})
        log.append("round", record)
    last = hashlib.sha256(f"adapter {rounds}".encode()).hexdigest() if trained else None
    log.append("run-end", {"final_adapter": "adapter" if trained else None, "final_adapter_sha256": last,
                           "rounds": rounds, "final_accuracy": 0.4 + 0.2 * rounds if trained else None,
                           "site_epsilon": {s: 2.0 * rounds for s in SITES[:2]} if trained else {}})
    return SmallRun(log.path, _pub(key, directory / "coordinator.pub"),
                    {s: site_log.path for s, site_log in site_logs.items()},
                    {s: _pub(site_keys[s], directory / f"site-{s}.pub") for s in SITES})
