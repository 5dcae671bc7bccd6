"""Adaptive server optimizers over the mean client update (Reddi et al., "Adaptive Federated Optimization", 2021).

Each rule treats the weighted mean update  delta = sum(w_k * delta_k) / sum(w_k)  as a pseudo-gradient step and
keeps its moments across rounds; all need only the sum, so they work on a secure sum. Defaults follow Flower's
strategies of the same names (no bias correction, as there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpeft.errors import FederationError
from fedpeft.strategies.base import AggregationRule, State, register_rule


def mean_update(update_sum: Mapping[str, Any], weight_sum: float) -> State:
    if not weight_sum > 0:
        raise FederationError("cannot average: the sum of client weights is not positive (no client returned)")
    return {key: value / weight_sum for key, value in update_sum.items()}


def prefixed(parts: Mapping[str, State]) -> State:
    return {f"{part}/{key}": value for part, tensors in parts.items() for key, value in tensors.items()}


def unprefixed(state: Mapping[str, Any], parts: tuple[str, ...], rule: str) -> dict[str, State]:
    out: dict[str, State] = {part: {} for part in parts}
    for name, value in state.items():
        part, _, key = name.partition("/")
        if part not in out or not key:
            raise FederationError(f"checkpoint tensor '{name}' is not state of aggregation rule '{rule}'; resume "
                                  "with the aggregation the run started with")
        out[part][key] = value
    return out


@register_rule
class FedAvgM(AggregationRule):
    """Server momentum: v = beta * v + delta; x = x + lr * v (Hsu et al., 2019)."""

    name = "fedavgm"

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9, **_: Any) -> None:
        self.lr, self.momentum = server_learning_rate, server_momentum
        self.velocity: State = {}

    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        delta = mean_update(update_sum, weight_sum)
        self.velocity = {k: self.momentum * self.velocity[k] + d if k in self.velocity else d for k, d in delta.items()}
        return {k: global_state[k] + self.lr * self.velocity[k] for k in global_state}

    def state_dict(self) -> State:
        return prefixed({"velocity": self.velocity})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = unprefixed(state, ("velocity",), self.name)["velocity"]


class _Adaptive(AggregationRule):
    """Shared moment bookkeeping of FedAdagrad / FedAdam / FedYogi: x = x + lr * m / (sqrt(v) + tau)."""

    default_lr = 0.1
    default_tau = 1e-9

    def __init__(self, server_learning_rate: float = 0.0, beta_1: float = 0.9, beta_2: float = 0.99,
                 tau: float = 0.0, **_: Any) -> None:
        self.lr = server_learning_rate or self.default_lr
        self.tau = tau or self.default_tau
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.m: State = {}
        self.v: State = {}

    def second_moment(self, v: Any, delta: Any) -> Any:
        raise NotImplementedError

    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        delta = mean_update(update_sum, weight_sum)
        for k, d in delta.items():
            self.m[k] = self.beta_1 * self.m[k] + (1 - self.beta_1) * d if k in self.m else (1 - self.beta_1) * d
            self.v[k] = self.second_moment(self.v.get(k, d * 0), d)
        return {k: global_state[k] + self.lr * self.m[k] / (self.v[k].sqrt() + self.tau) for k in global_state}

    def state_dict(self) -> State:
        return prefixed({"m": self.m, "v": self.v})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        parts = unprefixed(state, ("m", "v"), self.name)
        self.m, self.v = parts["m"], parts["v"]


@register_rule
class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def __init__(self, server_learning_rate: float = 0.0, beta_1: float = 0.0, tau: float = 0.0, **_: Any) -> None:
        super().__init__(server_learning_rate, beta_1=beta_1, tau=tau)

    def second_moment(self, v: Any, delta: Any) -> Any:
        return v + delta * delta


@register_rule
class FedAdam(_Adaptive):
    name = "fedadam"

    def second_moment(self, v: Any, delta: Any) -> Any:
        return self.beta_2 * v + (1 - self.beta_2) * delta * delta


@register_rule
class FedYogi(_Adaptive):
    name = "fedyogi"
    default_lr = 0.01
    default_tau = 1e-3

    def second_moment(self, v: Any, delta: Any) -> Any:
        squared = delta * delta
        return v - (1 - self.beta_2) * squared * (v - squared).sign()
