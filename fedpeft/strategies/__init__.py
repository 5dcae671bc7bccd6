"""Aggregation rules over a weighted sum of client updates, and their registry."""

from fedpeft.strategies import fedavg as _fedavg  # noqa: F401  (registers the built-in rules)
from fedpeft.strategies import server_opt as _server_opt  # noqa: F401
from fedpeft.strategies.base import AggregationRule, WeightedSum, build_rule, register_rule, registered_rules

__all__ = ["AggregationRule", "WeightedSum", "build_rule", "register_rule", "registered_rules"]
