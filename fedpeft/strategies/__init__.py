"""Aggregation rules over a weighted sum of client updates (or, for robust rules, the individual updates), and
their registry."""

from fedpeft.strategies import fedavg as _fedavg  # noqa: F401  (registers the built-in rules)
from fedpeft.strategies import robust as _robust  # noqa: F401
from fedpeft.strategies import server_opt as _server_opt  # noqa: F401
from fedpeft.strategies import server_sgd as _server_sgd  # noqa: F401
from fedpeft.strategies.base import (
    AggregationRule,
    IndividualUpdatesRule,
    WeightedSum,
    build_rule,
    register_rule,
    registered_rules,
)

__all__ = ["AggregationRule", "IndividualUpdatesRule", "WeightedSum", "build_rule", "register_rule",
           "registered_rules"]
