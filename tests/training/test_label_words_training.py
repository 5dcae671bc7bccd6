"""Training a LoRA adapter through label words, plainly and under DP-SGD (Opacus' per-example gradients)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.methods import build_method
from fedpeft.models.adapter_state import get_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.dp_sgd import DpSettings, make_private, private_loss
from fedpeft.training.batches import encode_classification, trim_batch
from fedpeft.training.trainer import batch_loss, evaluate, train_local

TWO_PATHS = ["billing", "account access"]  # a single-token and a two-token word: both scoring paths


def _cfg(words=("billing", "access"), **train):
    return from_mapping({
        "model": {"name": "tiny-llama", "classifier": "label-words", "label_words": list(words),
                  "quantization": "none"},
        "peft": {"dropout": 0.0},  # per-example gradients are compared across passes: no random masks
        "train": {"batch_size": 8, "learning_rate": 1e-2, **train},
    })


def _model_and_data(cfg, rows: int = 32):
    base, tokenizer = load_base_model(cfg.model, 2)
    model = build_method(cfg).wrap(base, seed=0)
    texts = tuple(f"ticket {i}: " + ("my invoice was charged twice" if i % 2 == 0 else "the login page rejects me")
                  for i in range(rows))
    labels = tuple(i % 2 for i in range(rows))
    return model, encode_classification(texts, labels, tokenizer, max_length=24)


def test_label_word_classification_trains_and_only_the_adapter_travels():
    cfg = _cfg(local_epochs=4)
    model, data = _model_and_data(cfg)
    before = evaluate(model, data, 64, "classification")
    train_local(model, data, cfg.train, "classification", seed=0)
    after = evaluate(model, data, 64, "classification")
    assert after.loss < before.loss - 0.1, (before, after)
    assert after.accuracy == 1.0
    state = get_adapter_state(model)
    assert state and all(".lora_" in name for name in state), "no head: LoRA tensors only"


def test_opacus_per_example_gradients_are_the_gradients_of_each_examples_own_loss():
    cfg = _cfg(TWO_PATHS)  # the two-token word runs the LM twice per batch: Opacus must sum both calls per row
    model, data = _model_and_data(cfg, rows=6)
    batch = trim_batch(data.input_ids, data.attention_mask, data.labels)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    private = make_private(model, optimizer, data, batch_size=6, dp=DpSettings(0.0, 1.0), poisson_sampling=False)
    try:
        loss = private_loss(private, batch, "classification")
        loss.backward()
        trainable = [(n, p) for n, p in private.module.named_parameters() if p.requires_grad]
        per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable}
        for i in range(len(data)):
            row = {key: value[i: i + 1] for key, value in batch.items()}
            private.module.zero_grad(set_to_none=True)
            for _, p in trainable:
                p.grad_sample = None
            alone = batch_loss(private.module, row, "classification")[0]
            grads = torch.autograd.grad(alone, [p for _, p in trainable])
            # fp32 sums in another order (batched vs alone, CPU kernels vary): measured up to 3.5e-6 at gradient
            # entries of 0.6 on an AMD EPYC; a per-sample gradient that misses or doubles a call is off by ~0.1-1.
            for (name, _), grad in zip(trainable, grads, strict=True):
                torch.testing.assert_close(per_sample[name][i], grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        private.module._close()


@pytest.mark.parametrize("rows", [1, 5])
def test_the_batch_loss_is_the_mean_of_each_examples_own_loss(rows):
    cfg = _cfg(TWO_PATHS)
    model, data = _model_and_data(cfg, rows=rows)
    batch = trim_batch(data.input_ids, data.attention_mask, data.labels)
    with torch.no_grad():
        together = batch_loss(model, batch, "classification")[0]
        alone = [batch_loss(model, {k: v[i: i + 1] for k, v in batch.items()}, "classification")[0]
                 for i in range(rows)]
    torch.testing.assert_close(together, torch.stack(alone).mean(), atol=1e-6, rtol=1e-5)
