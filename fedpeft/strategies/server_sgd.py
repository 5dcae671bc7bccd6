"""The server's DP-SGD step (distributed DP): the sites send clipped gradient *sums*, not updates.

In ``privacy.dp_mode = "distributed"`` a round is one DP-SGD step across the sites: the decoded secure sum is the
noisy sum of every sampled row's clipped gradient, and ``weight_sum`` is the expected batch (q times the rows of the
sites in the sum). The rule divides, keeps heavy-ball momentum and steps -- post-processing of the released sum, so
it costs no privacy. Defaults follow the DP linear probe measured in ``../shared/notes/private-utility.md`` (full
batch, momentum 0.9, learning rate 4 on the mean gradient).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.strategies.base import AggregationRule, State, register_rule
from fedpeft.strategies.server_opt import mean_update, prefixed, unprefixed


@register_rule
class ServerSgd(AggregationRule):
    """x = x - lr * v,  v = momentum * v + (noisy gradient sum) / (expected batch)."""

    name = "server-sgd"
    takes_gradients = True

    def __init__(self, server_learning_rate: float = 4.0, server_momentum: float = 0.9, **_: Any) -> None:
        self.lr, self.momentum = server_learning_rate, server_momentum
        self.velocity: State = {}

    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        gradient = mean_update(update_sum, weight_sum)
        self.velocity = {**self.velocity, **{k: self.momentum * self.velocity[k] + g if k in self.velocity else g
                                             for k, g in gradient.items()}}
        # a tensor the round's sum does not cover stays (e.g. probe-lora's LoRA in its head-only rounds)
        return {k: global_state[k] - self.lr * self.velocity[k] if k in gradient else global_state[k]
                for k in global_state}

    def state_dict(self) -> State:
        return prefixed({"velocity": self.velocity})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = unprefixed(state, ("velocity",), self.name)["velocity"]
