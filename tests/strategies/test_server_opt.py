"""Each server optimizer checked against a hand computation over two rounds (Reddi et al. 2021; Flower's forms)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.strategies import build_rule

X0 = 1.0
# Two rounds; each round's weighted sum of client deltas and weight sum, so mean deltas are 0.5 and -0.25.
ROUNDS = [(torch.tensor([2.0]), 4.0), (torch.tensor([-1.0]), 4.0)]
D1, D2 = 0.5, -0.25


def _run(name: str, **options) -> list[float]:
    rule, state, out = build_rule(name, **options), {"w": torch.tensor([X0])}, []
    for update_sum, weight_sum in ROUNDS:
        state = rule.aggregate(state, {"w": update_sum}, weight_sum)
        out.append(float(state["w"]))
    return out


def test_fedavgm():
    lr, beta = 0.5, 0.9
    v1 = D1
    v2 = beta * v1 + D2
    assert _run("fedavgm", server_learning_rate=lr, server_momentum=beta) == pytest.approx(
        [X0 + lr * v1, X0 + lr * v1 + lr * v2])


def test_fedadam():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    m1, v1 = (1 - b1) * D1, (1 - b2) * D1**2
    m2, v2 = b1 * m1 + (1 - b1) * D2, b2 * v1 + (1 - b2) * D2**2
    x1 = X0 + lr * m1 / (math.sqrt(v1) + tau)
    assert _run("fedadam", server_learning_rate=lr, beta_1=b1, beta_2=b2, tau=tau) == pytest.approx(
        [x1, x1 + lr * m2 / (math.sqrt(v2) + tau)])


def test_fedyogi():
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    m1 = (1 - b1) * D1
    v1 = 0 - (1 - b2) * D1**2 * math.copysign(1, 0 - D1**2)
    m2 = b1 * m1 + (1 - b1) * D2
    v2 = v1 - (1 - b2) * D2**2 * math.copysign(1, v1 - D2**2)
    x1 = X0 + lr * m1 / (math.sqrt(v1) + tau)
    assert _run("fedyogi", server_learning_rate=lr, beta_1=b1, beta_2=b2, tau=tau) == pytest.approx(
        [x1, x1 + lr * m2 / (math.sqrt(v2) + tau)])


def test_fedadagrad():
    lr, tau = 0.1, 1e-9
    v1, v2 = D1**2, D1**2 + D2**2
    x1 = X0 + lr * D1 / (math.sqrt(v1) + tau)
    assert _run("fedadagrad", server_learning_rate=lr, tau=tau) == pytest.approx(
        [x1, x1 + lr * D2 / (math.sqrt(v2) + tau)])


def test_rule_defaults_follow_flower():
    assert build_rule("fedadam").lr == 0.1 and build_rule("fedyogi").lr == 0.01
    assert build_rule("fedyogi").tau == 1e-3 and build_rule("fedadagrad").tau == 1e-9


def test_fedprox_averages_like_fedavg_and_its_proximal_term_pulls_towards_the_global_adapter():
    from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
    from fedpeft.methods import wrap_with_peft
    from fedpeft.models.adapter_state import get_adapter_state
    from fedpeft.models.loader import load_base_model
    from fedpeft.training.batches import encode_classification
    from fedpeft.training.trainer import train_local

    assert _run("fedprox") == _run("fedavg") == pytest.approx([X0 + D1, X0 + D1 + D2])
    drift = []
    for mu in (0.0, 100.0):
        base, tokenizer = load_base_model(ModelConfig(name="tiny-llama"), 2)
        model = wrap_with_peft(base, PeftConfig(r=4), "classification")
        start = get_adapter_state(model)
        data = encode_classification(tuple(f"note {i}" for i in range(16)), tuple(i % 2 for i in range(16)),
                                     tokenizer, 12)
        train_local(model, data, TrainConfig(learning_rate=1e-2, local_epochs=3, batch_size=4), "classification",
                    seed=0, proximal_mu=mu)
        end = get_adapter_state(model)
        drift.append(sum(float((end[k] - start[k]).norm()) for k in start))
    assert drift[1] < 0.8 * drift[0]
