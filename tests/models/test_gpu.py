"""On a CUDA GPU: the 4-bit base, local training and DP-SGD all run on the device (marker ``gpu``; CI has none)."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import get_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.dp_sgd import DpSettings, train_private
from fedpeft.training.batches import encode_prompt_response
from fedpeft.training.trainer import evaluate, train_local

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NF4 = ModelConfig(name="tiny-llama", task="causal-lm", quantization="nf4")  # bf16 compute, the default


def _site():
    base, tokenizer = load_base_model(NF4, 0)
    model = wrap_with_peft(base, PeftConfig(r=4, dropout=0.0), "causal-lm")
    data = encode_prompt_response(("how urgent is this ticket",) * 4 + ("which team handles a late fee",) * 4,
                                  ("urgent",) * 4 + ("billing",) * 4, tokenizer, max_length=24)
    return model, data


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[name], after[name]) for name in before)


def test_the_nf4_site_model_lives_on_the_gpu_and_trains_after_evaluating():
    model, data = _site()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = get_adapter_state(model)
    assert math.isfinite(evaluate(model, data, 4, "causal-lm").loss)  # CPU batches reach the cuda model
    result = train_local(model, data, TrainConfig(learning_rate=1e-2, batch_size=4, local_epochs=2), "causal-lm",
                         seed=0)
    assert math.isfinite(result.mean_loss) and result.steps == 4
    assert _changed(before, get_adapter_state(model))
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_dp_sgd_trains_the_nf4_adapter_on_the_gpu(mode):
    model, data = _site()
    before = get_adapter_state(model)
    result = train_private(model, data, TrainConfig(learning_rate=1e-2, batch_size=4, local_epochs=2),
                           "causal-lm", seed=0, dp=DpSettings(1.0, 1.0, mode))
    assert result.steps == 4 and math.isfinite(result.train.mean_loss)
    after = get_adapter_state(model)
    assert _changed(before, after) and all(torch.isfinite(t).all() for t in after.values())
