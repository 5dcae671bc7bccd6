"""LoRA-aware aggregation: FFA-LoRA (A frozen at a shared seeded init) is exact, FedIT (averaging A and B) is not."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import get_wire_state, set_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.strategies import WeightedSum, build_rule

WEIGHTS = [1.0, 2.0, 5.0]


def _model(mode: str):
    base, _ = load_base_model(ModelConfig(name="tiny-llama", task="causal-lm", quantization="none"), 0)
    return wrap_with_peft(base, PeftConfig(r=4, lora_mode=mode), "causal-lm", seed=7)


def _delta_weights(model) -> dict[str, torch.Tensor]:
    return {name: module.get_delta_weight("default").detach().clone() for name, module in model.named_modules()
            if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")}


def _federate(mode: str) -> tuple[dict, dict]:
    """Three 'trained' sites (their trainable tensors moved at random) -> (aggregated dW, weighted mean of dWs)."""
    start = get_wire_state(_model(mode))
    total, site_deltas = WeightedSum(), []
    for k, weight in enumerate(WEIGHTS):
        site = _model(mode)
        generator = torch.Generator().manual_seed(k)
        trained = {n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in start.items()}
        set_adapter_state(site, trained)
        site_deltas.append(_delta_weights(site))
        total.add({n: trained[n] - start[n] for n in start}, weight)
    new_global = build_rule("fedavg").aggregate(start, total.update_sum, total.weight_sum)
    server = _model(mode)
    set_adapter_state(server, new_global)
    mean = {n: sum(w * d[n] for w, d in zip(WEIGHTS, site_deltas, strict=True)) / sum(WEIGHTS) for n in site_deltas[0]}
    return _delta_weights(server), mean


def test_ffa_sends_only_b_and_half_the_adapter():
    fedit, ffa = get_wire_state(_model("fedit")), get_wire_state(_model("ffa"))
    assert all(".lora_B." in name for name in ffa) and set(ffa) < set(fedit)
    assert sum(t.numel() for t in ffa.values()) < 0.6 * sum(t.numel() for t in fedit.values())


def test_every_process_builds_the_same_frozen_a():
    a, b = _model("ffa"), _model("ffa")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if ".lora_A." in name:
            assert torch.equal(pa, pb) and not pa.requires_grad


def test_ffa_aggregation_is_exact():
    aggregated, mean = _federate("ffa")
    for name in mean:
        assert torch.allclose(aggregated[name], mean[name], atol=1e-6), name


def test_fedit_aggregation_is_not_the_mean_of_the_sites_updates():
    aggregated, mean = _federate("fedit")
    worst = max(float((aggregated[n] - mean[n]).abs().max() / mean[n].abs().max()) for n in mean)
    assert worst > 0.01  # mean(B_k A_k) != mean(B_k) mean(A_k)


def test_a_wire_state_with_the_wrong_keys_is_refused():
    from fedpeft.errors import AdapterMismatchError

    fedit_state = get_wire_state(_model("fedit"))
    with pytest.raises(AdapterMismatchError, match="unexpected"):
        set_adapter_state(_model("ffa"), fedit_state | {"extra.lora_A.weight": torch.zeros(1)})
