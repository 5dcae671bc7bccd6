from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import AdapterMismatchError, ModelError
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import check_adapter_state, get_adapter_state, set_adapter_state
from fedpeft.models.loader import load_base_model


def _tiny(task: str = "classification", r: int = 4):
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama", task=task), num_labels=3)
    return wrap_with_peft(base, PeftConfig(r=r), task), tokenizer


def test_only_adapter_and_head_tensors_are_exported():
    model, _ = _tiny()
    state = get_adapter_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "score" in name for name in state)
    assert any("score" in name for name in state), "the classification head must travel"
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for n, p in model.named_parameters()
                                                         if n in trainable)
    base_params = sum(p.numel() for p in model.parameters())
    assert sum(t.numel() for t in state.values()) < 0.1 * base_params


def test_tiny_llama_is_identical_in_every_process_build():
    a, _ = load_base_model(ModelConfig(name="tiny-llama"), num_labels=3)
    b, _ = load_base_model(ModelConfig(name="tiny-llama"), num_labels=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


def test_state_round_trips_into_a_fresh_model_with_identical_outputs():
    source, tokenizer = _tiny()
    with torch.no_grad():
        for param in source.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    target, _ = _tiny()
    set_adapter_state(target, get_adapter_state(source))
    batch = tokenizer(["a short note", "another one"], return_tensors="pt", padding=True)
    source.eval(), target.eval()
    assert torch.allclose(source(**batch).logits, target(**batch).logits, atol=1e-6)


def test_mismatched_keys_shapes_and_nan_are_refused_with_clear_errors():
    model, _ = _tiny(r=4)
    state = get_adapter_state(model)
    name = next(iter(state))
    with pytest.raises(AdapterMismatchError, match="1 missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(AdapterMismatchError, match="1 unexpected"):
        set_adapter_state(model, {**state, "base_model.model.embed.weight": torch.zeros(2)})
    other, _ = _tiny(r=8)
    with pytest.raises(AdapterMismatchError, match="has shape .* peft.r"):
        set_adapter_state(model, get_adapter_state(other))
    with pytest.raises(AdapterMismatchError, match="NaN"):
        check_adapter_state(state, {**state, name: torch.full_like(state[name], float("nan"))}, "test")


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="neither a built-in model"):
        load_base_model(ModelConfig(name=str(tmp_path / "missing")), num_labels=2)
    with pytest.raises(ModelError, match="no config.json"):
        load_base_model(ModelConfig(name=str(tmp_path)), num_labels=2)


def test_encoder_models_refuse_causal_lm():
    with pytest.raises(ModelError, match="no LM head for causal-lm"):
        load_base_model(ModelConfig(name="minilm", task="causal-lm"), num_labels=0)


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_a_state_without_the_head_leaves_the_local_head_alone(method):
    from fedpeft.models.adapter_state import get_head_state, get_wire_state

    base, _ = load_base_model(ModelConfig(name="minilm", quantization="none"), num_labels=3)
    model = wrap_with_peft(base, PeftConfig(method=method, r=4, trainable_blocks=1), "classification")
    head = get_head_state(model)
    assert head and all("classifier" in name for name in head)
    headless = get_wire_state(model, local_head=True)
    assert set(headless) == set(get_wire_state(model)) - set(head)
    set_adapter_state(model, {**get_wire_state(model), **{name: t + 1.0 for name, t in head.items()}},
                      source="test head")
    set_adapter_state(model, {name: t + 2.0 for name, t in headless.items()}, source="global without head")
    after = get_wire_state(model)
    assert all(torch.equal(after[name], head[name] + 1.0) for name in head), "the head is the site's own"
    assert all(torch.equal(after[name], headless[name] + 2.0) for name in headless)


def test_head_names_are_recognised_in_every_naming():
    from fedpeft.models.blocks import is_head

    assert is_head("classifier.weight") and is_head("base_model.model.score.weight")
    assert is_head("base_model.classifier.modules_to_save.default.bias")
    assert not is_head("base_model.model.bert.encoder.layer.0.output.dense.lora_A.weight")
    assert not is_head("base_model.model.model.layers.1.mlp.score_proj.weight")
