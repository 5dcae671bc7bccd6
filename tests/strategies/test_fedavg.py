from __future__ import annotations

import pytest
import torch

from fedpeft.errors import ConfigError, FederationError
from fedpeft.strategies import WeightedSum, build_rule, registered_rules


def test_fedavg_is_the_weighted_mean_of_client_models_by_hand():
    global_state = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    # client models 3, 5 (weights 1, 3): mean = (3*1 + 5*3)/4 = 4.5
    clients = [({"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([[1.0]])}, 1.0),
               ({"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([[-1.0]])}, 3.0)]
    total = WeightedSum()
    for model, weight in clients:
        total.add({k: model[k] - global_state[k] for k in model}, weight)
    new = build_rule("fedavg").aggregate(global_state, total.update_sum, total.weight_sum)
    assert torch.allclose(new["a"], torch.tensor([(3 * 1 + 5 * 3) / 4, (2 * 1 + 6 * 3) / 4]))
    assert torch.allclose(new["b"], torch.tensor([[(1 * 1 - 1 * 3) / 4]]))
    assert total.count == 2 and total.weight_sum == 4.0


def test_rules_declare_whether_they_work_on_a_secure_sum():
    assert registered_rules()["fedavg"].works_on_secure_sum is True


def test_unknown_rule_and_bad_sums_are_errors():
    with pytest.raises(ConfigError, match="fedavg"):
        build_rule("krum")
    with pytest.raises(FederationError, match="not positive"):
        build_rule("fedavg").aggregate({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, 0.0)
    total = WeightedSum()
    total.add({"a": torch.zeros(1)}, 1.0)
    with pytest.raises(FederationError, match="tensor names"):
        total.add({"b": torch.zeros(1)}, 1.0)
    with pytest.raises(FederationError, match="positive"):
        total.add({"a": torch.zeros(1)}, 0.0)
