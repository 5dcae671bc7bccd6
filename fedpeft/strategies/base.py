"""A rule turns the *sum* of weighted client updates into the next global state.

As in TensorFlow Federated's aggregators, a mean is a weighted sum plus a division: clients (or secure aggregation)
produce ``sum_k w_k * delta_k`` and ``sum_k w_k``; a rule only ever sees those two sums, never an individual update.
``works_on_secure_sum`` says so explicitly, so that a run can refuse rules that would need individual updates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from fedpeft.errors import ConfigError, FederationError

State = dict[str, Any]  # parameter name -> tensor

_RULES: dict[str, type[AggregationRule]] = {}


class AggregationRule(ABC):
    """One server-side update rule over the decoded weighted sum of client deltas."""

    name: ClassVar[str]
    works_on_secure_sum: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        """Rules take the ``[strategy]`` options they use and ignore the others (all rules get the same set)."""

    @abstractmethod
    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        """Return the next global state from the current one and the weighted sum of client deltas."""

    def state_dict(self) -> State:
        """Tensors the rule carries between rounds (server momentum, moments), for resumable runs."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise FederationError(f"aggregation rule '{self.name}' keeps no state between rounds, but the checkpoint "
                                  f"holds {len(state)} rule tensors; resume with the aggregation the run started with")


def register_rule(cls: type[AggregationRule]) -> type[AggregationRule]:
    if cls.name in _RULES:
        raise ValueError(f"aggregation rule '{cls.name}' is registered twice")
    _RULES[cls.name] = cls
    return cls


def registered_rules() -> dict[str, type[AggregationRule]]:
    return dict(_RULES)


def build_rule(name: str, **options: Any) -> AggregationRule:
    try:
        cls = _RULES[name]
    except KeyError:
        raise ConfigError(f"federation.aggregation = {name!r} is unknown; use one of {sorted(_RULES)}") from None
    return cls(**options)


class WeightedSum:
    """Accumulates ``sum_k w_k * delta_k`` and ``sum_k w_k`` in plain (non-secure) aggregation."""

    def __init__(self) -> None:
        self.update_sum: State = {}
        self.weight_sum = 0.0
        self.count = 0

    def add(self, update: Mapping[str, Any], weight: float) -> None:
        if not weight > 0:
            raise FederationError(f"client weight must be positive, got {weight!r}")
        if self.update_sum and set(update) != set(self.update_sum):
            raise FederationError("client updates disagree on their tensor names; every client must train the "
                                  "same adapter")
        for key, value in update.items():
            weighted = value * weight
            self.update_sum[key] = self.update_sum[key] + weighted if key in self.update_sum else weighted
        self.weight_sum += weight
        self.count += 1
