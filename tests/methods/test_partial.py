"""BitFit, layer freezing and full fine-tuning: exactly the method's base tensors train and travel; the rest of the
base is untouched; combinations the method cannot honour are refused when the run is built; checkpoints load back."""

from __future__ import annotations

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import ConfigError, ModelError
from fedpeft.methods import load_saved_adapter, wrap_with_peft
from fedpeft.methods.partial import PartialConfig
from fedpeft.models.adapter_state import get_wire_state, set_adapter_state, untravelled_trainable
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import method_config

TINY = ModelConfig(name="tiny-llama", task="classification", quantization="none")


def _wrapped(peft: PeftConfig, model: ModelConfig = TINY):
    base, _ = load_base_model(model, 3)
    return wrap_with_peft(base, peft, model.task)


def test_layer_freezing_trains_the_top_blocks_and_the_head_only():
    model = _wrapped(PeftConfig(method="freeze", trainable_blocks=1))
    wire = get_wire_state(model)
    assert wire and all(name.startswith(("model.layers.1.", "score.")) for name in wire)
    assert any(name.startswith("score.") for name in wire) and any(".layers.1.mlp." in n for n in wire)
    assert not untravelled_trainable(model)
    assert method_config(model) == PartialConfig("freeze", 1, "classification")


def test_full_fine_tuning_trains_every_parameter():
    model = _wrapped(PeftConfig(method="full"))
    assert sum(t.numel() for t in get_wire_state(model).values()) == sum(p.numel() for p in model.parameters())


def test_bitfit_trains_biases_and_the_head_and_refuses_a_base_without_biases():
    model = _wrapped(PeftConfig(method="bitfit"), ModelConfig(name="minilm", task="classification"))
    wire = get_wire_state(model)
    assert all(name.endswith(".bias") or name.startswith("classifier.") for name in wire)
    assert "classifier.weight" in wire and sum(t.numel() for t in wire.values()) < 30_000
    with pytest.raises(ModelError, match="no bias terms"):
        _wrapped(PeftConfig(method="bitfit"))  # Llama-family blocks have no biases


def test_combinations_a_partial_method_cannot_honour_are_refused_when_the_run_is_built():
    with pytest.raises(ConfigError, match="quantization"):
        from_mapping({"model": {"task": "causal-lm"}, "peft": {"method": "freeze"}})  # causal-lm defaults to nf4
    with pytest.raises(ConfigError, match="privacy.dp"):
        from_mapping({"peft": {"method": "full"}, "privacy": {"dp": True}})
    with pytest.raises(ConfigError, match="peft.trainable_blocks"):
        from_mapping({"peft": {"method": "freeze", "trainable_blocks": 0}})
    assert from_mapping({"model": {"task": "causal-lm", "quantization": "none"}, "peft": {"method": "full"}})


def test_a_checkpoint_loads_back_into_a_fresh_base_and_leaves_the_frozen_part_alone(tmp_path):
    from fedpeft.runs.checkpoint import save_global_adapter
    from fedpeft.runs.export import merge_into_base

    model = _wrapped(PeftConfig(method="freeze", trainable_blocks=1))
    trained = {name: tensor + 0.25 for name, tensor in get_wire_state(model).items()}
    set_adapter_state(model, trained)
    saved = save_global_adapter(tmp_path, 1, trained, method_config(model))
    fresh, _ = load_base_model(TINY, 3)
    untouched = {n: p.detach().clone() for n, p in fresh.named_parameters() if n not in trained}
    loaded = merge_into_base(load_saved_adapter(fresh, saved))
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in trained.items())
    assert all(torch.equal(params[name], tensor) for name, tensor in untouched.items())
    (saved / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="adapter_model.safetensors.*damaged"):
        load_saved_adapter(fresh, saved)
