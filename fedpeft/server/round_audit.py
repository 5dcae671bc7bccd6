"""One round as the coordinator's audit log records it: who took part, what arrived, what it produced.

Nothing here reveals an individual update: digests of what each site sent, and the norm of the *aggregate*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.privacy.client_dp import central_noise_std
from fedpeft.server.collect import RoundCollection


def round_audit_record(*, server_round: int, sampled: list[str], got: RoundCollection, aggregated: bool,
                       cfg: RunConfig, update_norm: float | None, client_epsilon: float | None,
                       adapter_sha256: str | None, global_accuracy: float | None,
                       site_name: Callable[[int], str]) -> dict[str, Any]:
    p = cfg.privacy
    noise_std = central_noise_std(p.client_noise_multiplier, p.client_clip) if p.client_dp != "off" else 0.0
    return {
        "round": server_round, "sites_sampled": sorted(sampled), "sites_returned": sorted(got.payload_sha256),
        "dropouts": {_site(site_name, node): reason for node, reason in got.failures.items()},
        "refusals": {site: refusal.reason for site, refusal in got.refusals.items()},
        "secure_aggregation": cfg.federation.secure_aggregation,
        "decoded": aggregated, "aggregated_updates": got.total.count,
        "client_dp": {"mode": p.client_dp, "noise_std_on_sum": noise_std, "epsilon": client_epsilon},
        "aggregate_update_norm": update_norm, "site_epsilon": dict(got.site_epsilon),
        "payload_sha256": dict(got.payload_sha256), "payload_bytes": dict(got.payload_bytes),
        "global_adapter_sha256": adapter_sha256, "global_accuracy": global_accuracy,
    }


def _site(site_name: Callable[[int], str], node: str) -> str:
    return site_name(int(node)) if node.isdigit() else node
