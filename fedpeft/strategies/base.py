"""A rule turns the client updates of a round into the next global state.

As in TensorFlow Federated's aggregators, a mean is a weighted sum plus a division: clients (or secure aggregation)
produce ``sum_k w_k * delta_k`` and ``sum_k w_k``; most rules only ever see those two sums, never an individual
update, which is what lets them run on a secure sum.  Robust rules (median, trimmed mean) cannot be written over a
sum: they subclass ``IndividualUpdatesRule`` and take the (delta, weight) pairs instead.

``works_on_secure_sum`` is the one flag that tells the two kinds apart: True means "give me ``aggregate`` over the
sums", False means "give me ``aggregate_updates`` over the individual pairs" -- and, since secure aggregation never
reveals an individual update, it also means the rule cannot run with secure aggregation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedpeft.errors import ConfigError, FederationError
from fedpeft.registry import Registry

State = dict[str, Any]  # parameter name -> tensor

_RULES: Registry[AggregationRule] = Registry("aggregation rule", "federation.aggregation", ConfigError)


class AggregationRule(ABC):
    """One server-side update rule over the decoded weighted sum of client deltas."""

    name: ClassVar[str]
    works_on_secure_sum: ClassVar[bool] = True
    client_proximal_term: ClassVar[bool] = False  # sites add (mu / 2) * ||w - w_global||^2 to their loss (FedProx)
    takes_gradients: ClassVar[bool] = False  # sites send clipped gradient sums, not updates (distributed DP)

    def __init__(self, **options: Any) -> None:
        """Rules take the ``[strategy]`` options they use and ignore the others (all rules get the same set)."""
        del options  # the base rule uses none of them

    @abstractmethod
    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        """Return the next global state from the current one and the weighted sum of client deltas."""

    def aggregate_updates(self, global_state: Mapping[str, Any],
                          updates: Sequence[tuple[Mapping[str, Any], float]]) -> State:
        """Return the next global state from the individual (delta, weight) pairs of the round's clients.

        A sum-based rule gets the same result either way, so it simply sums the pairs: a pipeline that holds
        individual updates (plain aggregation with ``WeightedSum(keep_updates=True)``) may call this on any rule.
        """
        total = WeightedSum()
        for update, weight in updates:
            total.add(update, weight)
        return self.aggregate(global_state, total.update_sum, total.weight_sum)

    def state_dict(self) -> State:
        """Tensors the rule carries between rounds (server momentum, moments), for resumable runs."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise FederationError(f"aggregation rule '{self.name}' keeps no state between rounds, but the checkpoint "
                                  f"holds {len(state)} rule tensors; resume with the aggregation the run started with")


class IndividualUpdatesRule(AggregationRule):
    """A rule that needs every client's update on its own (e.g. a coordinate-wise median), not just their sum.

    Such a rule cannot run on a secure sum, which by design never reveals an individual update; the server hands it
    the pairs that ``WeightedSum(keep_updates=True)`` kept, and config checks refuse it with secure aggregation.
    """

    works_on_secure_sum: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.works_on_secure_sum:  # one source of truth: the flag must agree with what the rule can consume
            raise TypeError(f"{cls.__name__} needs individual updates, so it cannot declare works_on_secure_sum")

    @abstractmethod
    def aggregate_updates(self, global_state: Mapping[str, Any],
                          updates: Sequence[tuple[Mapping[str, Any], float]]) -> State:
        """Return the next global state from the individual (delta, weight) pairs of the round's clients."""

    def aggregate(self, global_state: Mapping[str, Any], update_sum: Mapping[str, Any], weight_sum: float) -> State:
        raise FederationError(f"aggregation rule '{self.name}' needs the individual client updates, but was given "
                              "only their sum; secure aggregation never reveals individual updates, so use this "
                              "rule without federation.secure_aggregation")


def register_rule(cls: type[AggregationRule]) -> type[AggregationRule]:
    return _RULES.register(cls)


def registered_rules() -> dict[str, type[AggregationRule]]:
    return _RULES.all()


def build_rule(name: str, **options: Any) -> AggregationRule:
    return _RULES.get(name)(**options)


class WeightedSum:
    """Accumulates ``sum_k w_k * delta_k`` and ``sum_k w_k`` in plain (non-secure) aggregation.

    With ``keep_updates=True`` it also keeps each (delta, weight) pair in ``updates``, for rules that need
    individual updates (``works_on_secure_sum`` False).  Off by default: keeping them costs one adapter of memory
    per client, which sum-based rules never need.
    """

    def __init__(self, keep_updates: bool = False) -> None:
        self.update_sum: State = {}
        self.weight_sum = 0.0
        self.count = 0
        self.keep_updates = keep_updates
        self.updates: list[tuple[State, float]] = []

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
        if self.keep_updates:
            self.updates.append((dict(update), weight))
