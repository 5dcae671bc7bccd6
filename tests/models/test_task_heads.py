"""Multi-task heads: each example is scored against its own task's labels only."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.data.synthetic import MULTITASK_LABELS, make_multitask_tickets
from fedpeft.errors import DataError
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.models.task_heads import attach_task_heads, label_tasks, restrict_to_task, task_of_labels
from fedpeft.privacy.dp_sgd import DpSettings, make_private
from fedpeft.training.batches import encode_classification, trim_batch
from fedpeft.training.trainer import batch_loss


def test_tasks_come_from_label_name_prefixes_and_a_bare_label_is_a_clear_error():
    assert task_of_labels(MULTITASK_LABELS) == [0, 0, 0, 1, 1]
    with pytest.raises(DataError, match="'task:label'"):
        task_of_labels(("topic:billing", "urgent"))


def test_other_tasks_logits_change_neither_the_loss_nor_the_prediction():
    tasks = torch.tensor(task_of_labels(MULTITASK_LABELS))
    labels = torch.tensor([0, 4])  # a topic example and an urgency example
    logits = torch.randn(2, 5)
    noisy = logits.clone()
    noisy[0, 3:] += 100.0  # urgency logits of the topic example
    noisy[1, :3] += 100.0  # topic logits of the urgency example
    a, b = restrict_to_task(logits, labels, tasks), restrict_to_task(noisy, labels, tasks)
    assert torch.equal(torch.nn.functional.cross_entropy(a, labels), torch.nn.functional.cross_entropy(b, labels))
    assert b[0].argmax() < 3 <= b[1].argmax()


def test_the_model_scores_each_example_within_its_task_also_under_opacus():
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama", quantization="none"), len(MULTITASK_LABELS))
    model = wrap_with_peft(base, PeftConfig(r=2), "classification")
    data = make_multitask_tickets(12)
    encoded = encode_classification(data.texts, data.labels, tokenizer, 32)
    batch = trim_batch(encoded.input_ids, encoded.attention_mask, encoded.labels)
    model.eval()
    single = batch_loss(model, batch, "classification")[0]
    attach_task_heads(model, MULTITASK_LABELS)
    multi = batch_loss(model, batch, "classification")[0]
    assert float(multi) < float(single), "fewer competing labels: a lower loss"
    trainable = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(trainable, lr=0.0), encoded, len(encoded), dp=DpSettings(0.0, 1.0),
                           poisson_sampling=False)
    assert label_tasks(private.module) is not None
    private.module.eval()
    assert torch.allclose(batch_loss(private.module, batch, "classification")[0], multi)
    private.module._close()
    attach_task_heads(model, None)
    assert label_tasks(model) is None
