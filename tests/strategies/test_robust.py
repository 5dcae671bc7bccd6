from __future__ import annotations

import pytest
import torch

from fedpeft.config import StrategyConfig
from fedpeft.errors import ConfigError, FederationError
from fedpeft.strategies import (
    IndividualUpdatesRule,
    WeightedSum,
    build_rule,
    registered_rules,
)


def deltas(*columns: list[float], weights: list[float] | None = None) -> list[tuple[dict, float]]:
    """One client per column value: client k's delta of "a" is [columns[0][k], columns[1][k], ...]."""
    n = len(columns[0])
    weights = weights or [1.0] * n
    return [({"a": torch.tensor([col[k] for col in columns])}, weights[k]) for k in range(n)]


GLOBAL = {"a": torch.tensor([10.0, 20.0])}


def test_median_of_three_and_of_four_clients_by_hand():
    # odd n: the middle value per coordinate, whatever the weights (unweighted by design)
    three = deltas([1.0, -3.0, 2.0], [5.0, 4.0, 6.0], weights=[100.0, 1.0, 1.0])
    assert torch.equal(build_rule("median").aggregate_updates(GLOBAL, three)["a"], torch.tensor([10.0 + 1.0, 25.0]))
    # even n: the mean of the two middle values (torch.median alone would give the lower one)
    four = deltas([4.0, 1.0, 3.0, 2.0], [0.0, -1.0, 10.0, -8.0])
    assert torch.equal(build_rule("median").aggregate_updates(GLOBAL, four)["a"], torch.tensor([12.5, 19.5]))


def test_trimmed_mean_with_one_value_dropped_per_side_by_hand():
    # n = 5, trim_fraction 0.2 -> k = 1: drop min and max per coordinate, average the 3 left
    five = deltas([1.0, 2.0, 3.0, 4.0, 100.0], [-50.0, 0.0, 1.0, 2.0, 6.0])
    new = build_rule("trimmed-mean", trim_fraction=0.2).aggregate_updates(GLOBAL, five)
    assert torch.allclose(new["a"], torch.tensor([10.0 + 3.0, 20.0 + 1.0]))


def test_trimmed_mean_trims_floor_of_fraction_and_is_the_plain_mean_below_that():
    rule = build_rule("trimmed-mean", trim_fraction=0.2)
    assert [rule.trimmed_per_side(n) for n in (1, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    assert build_rule("trimmed-mean", trim_fraction=0.29).trimmed_per_side(100) == 29
    four = deltas([1.0, 2.0, 3.0, 10.0], [0.0, 0.0, 0.0, 4.0], weights=[1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(rule.aggregate_updates(GLOBAL, four)["a"], torch.tensor([14.0, 21.0]))  # unweighted mean
    zero = build_rule("trimmed-mean", trim_fraction=0.0)
    assert torch.allclose(zero.aggregate_updates(GLOBAL, deltas([1.0] * 4 + [11.0], [0.0] * 5))["a"],
                          torch.tensor([13.0, 20.0]))


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_one_huge_outlier_stays_within_the_honest_range(name):
    honest = [torch.tensor([[0.1, -0.2], [0.3, 0.0]]) * (1 + k / 10) for k in range(4)]
    attacker = torch.full((2, 2), 1e20)
    updates = [({"w": d}, 1.0) for d in honest] + [({"w": attacker}, 1e6)]
    glob = {"w": torch.zeros(2, 2)}
    mean = build_rule("fedavg").aggregate_updates(glob, updates)["w"]
    assert mean.abs().max() > 1e10  # a plain (weighted) mean is ruined by the one client...
    robust = build_rule(name).aggregate_updates(glob, updates)["w"]
    low, high = torch.stack(honest).min(dim=0).values, torch.stack(honest).max(dim=0).values
    assert torch.all(robust >= low) and torch.all(robust <= high)  # ...the robust rules are not


def test_robust_rules_are_registered_as_needing_individual_updates():
    rules = registered_rules()
    for name in ("median", "trimmed-mean"):
        assert issubclass(rules[name], IndividualUpdatesRule) and rules[name].works_on_secure_sum is False
    for name in ("fedavg", "fedprox", "fedadam"):
        assert rules[name].works_on_secure_sum is True
    assert "fedmedian" not in rules
    assert all(not issubclass(rule, IndividualUpdatesRule) for rule in rules.values() if rule.works_on_secure_sum)


def test_individual_update_rules_refuse_a_sum_and_cannot_claim_to_work_on_one():
    with pytest.raises(FederationError, match="individual client updates.*secure aggregation"):
        build_rule("median").aggregate(GLOBAL, {"a": torch.ones(2)}, 3.0)
    with pytest.raises(TypeError, match="works_on_secure_sum"):
        type("Bad", (IndividualUpdatesRule,), {"name": "bad", "works_on_secure_sum": True,
                                               "aggregate_updates": lambda self, g, u: {}})


def test_rules_get_trim_fraction_from_the_strategy_options_and_check_it():
    assert build_rule("trimmed-mean", **StrategyConfig(trim_fraction=0.3).rule_options()).trim_fraction == 0.3
    build_rule("median", **StrategyConfig().rule_options())  # ignores the options it does not use
    with pytest.raises(ConfigError, match="trim_fraction"):
        build_rule("trimmed-mean", trim_fraction=0.5)


@pytest.mark.parametrize("name", ["median", "trimmed-mean"])
def test_malformed_rounds_are_federation_errors(name):
    rule = build_rule(name)
    with pytest.raises(FederationError, match="no client"):
        rule.aggregate_updates(GLOBAL, [])
    with pytest.raises(FederationError, match="tensor names"):
        rule.aggregate_updates(GLOBAL, [({"a": torch.zeros(2)}, 1.0), ({"b": torch.zeros(2)}, 1.0)])
    with pytest.raises(FederationError, match="lack 1 global tensors.*'b'"):
        rule.aggregate_updates({**GLOBAL, "b": torch.zeros(1)}, [({"a": torch.zeros(2)}, 1.0)])
    with pytest.raises(FederationError, match="shape"):
        rule.aggregate_updates(GLOBAL, [({"a": torch.zeros(2)}, 1.0), ({"a": torch.zeros(3)}, 1.0)])
    with pytest.raises(FederationError, match="positive"):
        rule.aggregate_updates(GLOBAL, [({"a": torch.zeros(2)}, 0.0)])
    # names beyond the global state (e.g. the rank-weight vector) are allowed and ignored, as in fedavg
    extra = rule.aggregate_updates(GLOBAL, [({"a": torch.ones(2), "x": torch.ones(1)}, 1.0)])
    assert set(extra) == {"a"} and torch.equal(extra["a"], GLOBAL["a"] + 1)


def test_weighted_sum_keeps_the_pairs_only_when_asked_and_sums_the_same():
    updates = deltas([1.0, -2.0, 0.5], [3.0, 4.0, -1.0], weights=[2.0, 1.0, 5.0])
    plain, keeping = WeightedSum(), WeightedSum(keep_updates=True)
    for update, weight in updates:
        plain.add(update, weight)
        keeping.add(update, weight)
    assert plain.updates == [] and len(keeping.updates) == 3
    for (kept, w), (given, v) in zip(keeping.updates, updates, strict=True):
        assert kept["a"] is given["a"] and w == v  # the tensors themselves: keeping costs no copy
    assert torch.equal(plain.update_sum["a"], keeping.update_sum["a"])
    assert (plain.weight_sum, plain.count) == (keeping.weight_sum, keeping.count) == (8.0, 3)


def test_sum_rules_give_the_same_result_from_individual_updates():
    updates = deltas([1.0, -2.0, 0.5], [3.0, 4.0, -1.0], weights=[2.0, 1.0, 5.0])
    total = WeightedSum()
    for update, weight in updates:
        total.add(update, weight)
    by_sum = build_rule("fedavg").aggregate(GLOBAL, total.update_sum, total.weight_sum)
    assert torch.allclose(build_rule("fedavg").aggregate_updates(GLOBAL, updates)["a"], by_sum["a"])
