"""FedAvg (McMahan et al., 2017): the new global state is the weighted mean of the clients' local states."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.errors import FederationError
from fedpeft.strategies.base import AggregationRule, State, register_rule


@register_rule
class FedAvg(AggregationRule):
    """global + sum(w_k * delta_k) / sum(w_k), i.e. the weighted mean of the clients' new adapters."""

    name = "fedavg"
    works_on_secure_sum = True

    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        if not weight_sum > 0:
            raise FederationError("cannot average: the sum of client weights is not positive (no client returned)")
        missing = set(global_state) - set(update_sum)
        if missing:
            raise FederationError(f"update sum lacks {len(missing)} global tensors, e.g. {sorted(missing)[:3]}")
        return {key: global_state[key] + update_sum[key] / weight_sum for key in global_state}


@register_rule
class FedProx(FedAvg):
    """FedAvg on the server; each site adds (mu / 2) * ||w - w_global||^2 to its local loss (Li et al., 2020)."""

    name = "fedprox"
    client_proximal_term = True
