"""bf16 autocast for adapter training: gradients close to fp32, master weights stay fp32, peft's casts restored."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.models.precision import bf16_autocast
from fedpeft.privacy.dp_sgd import DpSettings, train_private
from fedpeft.training.batches import encode_prompt_response, iterate_batches
from fedpeft.training.trainer import batch_loss, train_local


def _site(quantization: str = "none"):
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama", task="causal-lm", quantization=quantization,
                                                  compute_dtype="bf16"), 0)
    model = wrap_with_peft(base, PeftConfig(r=4, dropout=0.0), "causal-lm")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    data = encode_prompt_response(("how urgent is this ticket", "which team handles a late fee") * 4,
                                  ("urgent", "billing") * 4, tokenizer, max_length=24)
    return model, data


def _gradients(model, batch, autocast: bool) -> torch.Tensor:
    model.zero_grad()
    with bf16_autocast(model, autocast) as forward_precision:
        with forward_precision():
            loss = batch_loss(model, batch, "causal-lm")[0]
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_autocast_gradients_stay_close_to_full_precision_and_peft_casting_is_restored():
    model, data = _site()
    batch = next(iter(iterate_batches(data, 8)))
    model.train()
    reference = _gradients(model, batch, autocast=False)
    mixed = _gradients(model, batch, autocast=True)
    assert mixed.dtype == torch.float32  # fp32 master weights get fp32 gradients
    cosine = float(torch.nn.functional.cosine_similarity(mixed, reference, dim=0))
    assert cosine > 0.99, cosine  # bf16 keeps 8 bits of mantissa: measured 0.9999 here
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(layers) == 14 and all(m.cast_input_dtype_enabled for m in layers)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_training_and_dp_training_run_under_autocast(quantization):
    model, data = _site(quantization)
    cfg = TrainConfig(learning_rate=1e-2, batch_size=4, local_epochs=3, autocast=True)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    first = train_local(model, data, TrainConfig(learning_rate=1e-2, batch_size=8, max_steps=1, autocast=True),
                        "causal-lm", seed=0)
    later = train_local(model, data, cfg, "causal-lm", seed=1)
    assert later.mean_loss < first.mean_loss
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    private = train_private(model, data, cfg, "causal-lm", seed=2, dp=DpSettings(1.0, 1.0, "hooks"))
    assert private.steps > 0 and math.isfinite(private.train.mean_loss)


def test_train_autocast_is_a_config_key():
    assert from_mapping({"train": {"autocast": True}}).train.autocast is True
    assert from_mapping({}).train.autocast is False
