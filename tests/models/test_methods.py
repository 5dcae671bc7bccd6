"""Every PEFT method crosses the peft boundary the same way: the trainable tensors out and back in, exactly."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.models.adapter_state import (
    get_wire_state,
    set_adapter_state,
    untravelled_trainable,
)
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import wrap_with_peft

METHODS = [PeftConfig(method="ia3"), PeftConfig(use_dora=True, r=4), PeftConfig(use_rslora=True, r=4),
           PeftConfig(method="prompt-tuning", virtual_tokens=4), PeftConfig(method="p-tuning", virtual_tokens=4),
           PeftConfig(method="prefix-tuning", virtual_tokens=4), PeftConfig(method="p-tuning-v2", virtual_tokens=4),
           PeftConfig(method="bottleneck", r=4), PeftConfig(method="freeze", trainable_blocks=1),
           PeftConfig(method="full")]


def _wrapped(peft: PeftConfig, task: str = "classification", seed: int = 0):
    base, _ = load_base_model(ModelConfig(name="tiny-llama", task=task, quantization="none"), 6)
    return wrap_with_peft(base, peft, task, seed)


@pytest.mark.parametrize("peft", METHODS, ids=lambda p: p.method + ("-dora" * p.use_dora) + ("-rs" * p.use_rslora))
def test_the_wire_state_is_every_trainable_tensor_and_round_trips(peft):
    model = _wrapped(peft)
    wire = get_wire_state(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in wire.values()) == trainable, "exactly the trainable values travel"
    assert not untravelled_trainable(model)
    changed = {name: tensor + 0.5 for name, tensor in wire.items()}
    other = _wrapped(peft, seed=1)
    set_adapter_state(other, changed)
    assert all(torch.equal(get_wire_state(other)[name], changed[name]) for name in changed)


def test_a_trainable_tensor_outside_the_adapter_is_detected():
    model = _wrapped(PeftConfig())
    next(p for n, p in model.named_parameters() if "embed_tokens" in n).requires_grad_(True)
    assert any("embed_tokens" in name for name in untravelled_trainable(model))


def test_prompt_methods_are_saved_in_peft_format():
    from fedpeft.config import from_mapping
    from fedpeft.server.initial import initial_adapter

    cfg = from_mapping({"model": {"name": "tiny-llama", "task": "causal-lm", "quantization": "none"},
                        "peft": {"method": "p-tuning", "virtual_tokens": 4}})
    initial = initial_adapter(cfg)
    assert all(name.startswith("prompt_encoder.") for name in initial.wire)
    saved = initial.saved_format(initial.wire)
    assert set(saved) == {"prompt_embeddings"} and saved["prompt_embeddings"].shape[0] == 4
