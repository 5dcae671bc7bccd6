"""The server's aggregation pipeline, one stage each, in TensorFlow Federated's order:

    decoded sum (plain or secure) -> noise on the sum and its accounting (client-level DP)
    -> the method's division inputs (e.g. per-rank weights) -> the rule -> the method's after-aggregation step
    -> a finite-state guard (the federation then checkpoints what it returns)

The stages name no method and no rule: the method (``fedpeft.methods``) and the rule (``fedpeft.strategies``) are
looked up once from the registries. A rule that needs individual updates (``works_on_secure_sum = False``) gets the
(update, weight) pairs the plain collection kept; the run's config checks already refused it with secure
aggregation, so no individual update is ever asked of a secure sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedpeft.methods import FederatedMethod
from fedpeft.models.adapter_state import AdapterState
from fedpeft.server.client_dp import ServerClientDp
from fedpeft.strategies import AggregationRule, WeightedSum


@dataclass(frozen=True)
class Aggregated:
    """What one round's aggregation produced (``state`` is None when the round changed nothing)."""

    state: AdapterState | None
    update_norm: float | None = None  # L2 norm of the mean update (of the aggregate only: never one site's)
    client_epsilon: float | None = None  # user-level epsilon after this round (client-level DP), else None
    rejected: str = ""  # why an aggregate was not applied (non-finite values, no usable weight), empty when it was


class AggregationPipeline:
    def __init__(self, *, method: FederatedMethod, rule: AggregationRule, client_dp: ServerClientDp) -> None:
        self.method, self.rule, self.client_dp = method, rule, client_dp

    @property
    def keeps_updates(self) -> bool:
        """Whether plain collection must keep each site's update (the rule cannot work on a sum)."""
        return not self.rule.works_on_secure_sum

    def __call__(self, global_state: Mapping[str, Any], total: WeightedSum, *, server_round: int,
                 sampled_fraction: float) -> Aggregated:
        if not (math.isfinite(total.weight_sum) and total.weight_sum > 0):  # the round's failure, not the run's
            return Aggregated(None, rejected=f"the weight sum {total.weight_sum!r} is not a positive finite number; "
                              "the global adapter is unchanged")
        update_sum = dict(total.update_sum)
        bookkeeping = {key: update_sum.pop(key) for key in self.method.bookkeeping if key in update_sum}
        update_sum, client_epsilon = self.client_dp.apply(update_sum, sampled_fraction)
        summed, weight_sum = self.method.mean_inputs({**update_sum, **bookkeeping}, total.weight_sum)
        norm = mean_update_norm(summed, weight_sum)
        if self.keeps_updates:
            state = self.rule.aggregate_updates(global_state, total.updates)
        else:
            state = self.rule.aggregate(global_state, summed, weight_sum)
        state = self.method.after_aggregation(state, server_round)
        bad = non_finite(state)
        if bad:  # one site's overflow must not become every site's starting point (nor a saved adapter)
            return Aggregated(None, norm, client_epsilon, rejected=f"the aggregate has non-finite values in "
                              f"{len(bad)} tensors (e.g. {bad[0]}); the global adapter is unchanged")
        return Aggregated(state, norm, client_epsilon)


def mean_update_norm(update_sum: Mapping[str, Any], weight_sum: float) -> float:
    squares = sum(float((tensor.double() ** 2).sum()) for tensor in update_sum.values())
    return squares ** 0.5 / weight_sum if weight_sum else 0.0


def non_finite(state: Mapping[str, Any]) -> list[str]:
    import torch

    return [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
