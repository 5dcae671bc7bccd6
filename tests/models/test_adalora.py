"""AdaLoRA's rank allocation across sites: the server's schedule and mask, and a site holding the mask."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
from fedpeft.errors import AdapterMismatchError
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adalora import (
    RankSchedule,
    keep_mask,
    keep_ranks,
    orthogonality_penalty,
    pack,
    prune,
    singular_value_names,
    singular_value_parameters,
    unpack,
)
from fedpeft.models.adapter_state import get_wire_state
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.dp_sgd import DpSettings, train_private
from fedpeft.training.batches import encode_classification
from fedpeft.training.trainer import train_local


def test_the_budget_holds_then_falls_cubically_to_r_per_module_then_holds():
    schedule = RankSchedule(rounds=8, warmup_rounds=2, final_rounds=2, init_r=12, target_r=8)
    budgets = [schedule.budget(t, 10) for t in range(9)]
    assert budgets[:2] == [120, 120] and budgets[6:] == [80, 80, 80]
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False)) and 80 < budgets[2] < 120
    # cubic: most of the pruning happens early
    assert budgets[2] - budgets[3] > budgets[4] - budgets[5]


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in ("m0.", "m1."):
        state[module + "lora_A"] = torch.randn(4, 6, generator=g)
        state[module + "lora_B"] = torch.randn(5, 4, generator=g)
        state[module + "lora_E"] = torch.randn(4, 1, generator=g)
    state["head.weight"] = torch.randn(3, 5, generator=g)
    return state


def test_the_mask_keeps_the_largest_rank_one_terms_over_all_modules():
    state = _state()
    keep = keep_mask(state, 3)
    assert sorted(keep) == singular_value_names(state) == ["m0.lora_E", "m1.lora_E"]
    assert sum(int(k.sum()) for k in keep.values()) == 3
    norms = {(name, i): float((state[name][i] * torch.outer(state[name[:-6] + "lora_B"][:, i],
                                                           state[name[:-6] + "lora_A"][i])).norm())
             for name in keep for i in range(4)}
    kept = {key for key in norms if keep[key[0]][key[1], 0]}
    assert min(norms[k] for k in kept) >= max(norms[k] for k in norms if k not in kept)
    pruned = prune(state, keep)
    assert torch.equal(pruned["head.weight"], state["head.weight"])
    assert sum(int((pruned[n] != 0).sum()) for n in keep) == 3
    assert all(torch.equal(keep_mask(pruned, 3)[n], keep[n]) for n in keep), "the kept set is stable"


def test_the_mask_travels_as_bits_and_a_wrong_size_is_a_clear_error():
    keep = keep_mask(_state(), 5)
    shapes = {name: tuple(mask.shape) for name, mask in keep.items()}
    assert len(pack(keep)) == 1
    back = unpack(pack(keep), shapes)
    assert all(torch.equal(back[n], keep[n]) for n in keep)
    with pytest.raises(AdapterMismatchError, match="adalora_init_r"):
        unpack(pack(keep) + b"\x00", shapes)


def _model_and_data():
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama", quantization="none"), 3)
    model = wrap_with_peft(base, PeftConfig(method="adalora", r=2, adalora_init_r=4, dropout=0.0),
                           "classification")
    texts = tuple(f"ticket {i} about a late fee" if i % 2 else f"cannot log in, case {i}" for i in range(24))
    return model, encode_classification(texts, tuple(i % 3 for i in range(24)), tokenizer, 16)


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sgd"])
def test_a_site_holds_masked_singular_values_at_zero_through_training(private):
    model, data = _model_and_data()
    params = singular_value_parameters(model)
    assert sorted(params) == singular_value_names(get_wire_state(model))
    with torch.no_grad():
        for param in params.values():
            param.normal_()
    keep = keep_mask(get_wire_state(model), budget=len(params))  # one of four per module on average
    before = {n: p.detach().clone() for n, p in params.items()}
    cfg = TrainConfig(batch_size=8, learning_rate=0.05, max_steps=3)
    with keep_ranks(model, pack(keep)):
        if private:  # noise lands on every coordinate; the mask must win over it
            train_private(model, data, cfg, "classification", seed=0, dp=DpSettings(1.0, 1.0))
        else:
            train_local(model, data, cfg, "classification", seed=0)
    for name, param in params.items():
        assert torch.all(param[~keep[name]] == 0), name
    assert any(not torch.equal(params[n][keep[n]], before[n][keep[n]]) for n in params), "kept values train"


def test_the_orthogonality_penalty_is_adalora_only_and_has_a_gradient():
    model, _ = _model_and_data()
    penalty = orthogonality_penalty(model)
    penalty.backward()
    assert float(penalty.detach()) > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)
    lora, _ = load_base_model(ModelConfig(name="tiny-llama", quantization="none"), 3)
    assert orthogonality_penalty(wrap_with_peft(lora, PeftConfig(r=2), "classification")) is None
