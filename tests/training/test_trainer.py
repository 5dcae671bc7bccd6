from __future__ import annotations

from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.training.batches import encode_classification
from fedpeft.training.trainer import evaluate, param_groups, predict, train_local


def _model():
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama"), num_labels=2)
    return wrap_with_peft(base, PeftConfig(r=4), "classification"), tokenizer


def test_head_and_adapter_get_their_configured_learning_rates():
    model, _ = _model()
    groups = param_groups(model, TrainConfig(learning_rate=1e-3, head_learning_rate=2e-2))
    assert [g["lr"] for g in groups] == [1e-3, 2e-2]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert param_groups(model, TrainConfig(learning_rate=1e-3, head_learning_rate=0.0))[1]["lr"] == 1e-3


def test_layered_rates_lower_each_block_below_the_one_above():
    import pytest

    from fedpeft.models.blocks import block_index

    model, _ = _model()  # tiny-llama: 2 blocks
    groups = param_groups(model, TrainConfig(learning_rate=1e-3, head_learning_rate=2e-2, layer_decay=0.5))
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 5e-4, 2e-2])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {block_index(names[id(p)]) for p in groups[0]["params"]} == {1}, "the top block keeps learning_rate"
    assert {block_index(names[id(p)]) for p in groups[1]["params"]} == {0}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert block_index("bert.encoder.layer.5.attention.self.query.lora_A.weight") == 5
    assert block_index("base_model.score.weight") is None


def test_local_training_fits_a_small_training_set():
    model, tokenizer = _model()
    texts = tuple(f"{w} ticket number {i}" for i, w in enumerate(["urgent", "routine"] * 16))
    data = encode_classification(texts, tuple(i % 2 for i in range(32)), tokenizer, max_length=16)
    before = evaluate(model, data, 32, "classification").loss
    train_local(model, data, TrainConfig(learning_rate=1e-2, local_epochs=5, batch_size=8), "classification", seed=0)
    assert evaluate(model, data, 32, "classification").loss < before


def test_predictions_agree_with_the_evaluated_accuracy_row_by_row():
    model, tokenizer = _model()
    texts = tuple(f"{w} ticket number {i}" for i, w in enumerate(["urgent", "routine"] * 10))
    data = encode_classification(texts, tuple(i % 2 for i in range(20)), tokenizer, max_length=16)
    train_local(model, data, TrainConfig(learning_rate=1e-2, local_epochs=2, batch_size=8), "classification", seed=0)
    predicted = predict(model, data, 7)  # a batch size that splits the rows unevenly
    assert predicted.shape == (20,)
    assert float((predicted == data.labels).float().mean()) == evaluate(model, data, 32, "classification").accuracy
