"""DP-SGD through Opacus on peft adapters: clipping bounds one example's influence; with no noise and no
clipping it equals plain SGD (guards the reported Opacus + peft gradient corruption, opacus issue #820)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig, TrainConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.dp_sgd import (
    DpSettings,
    _empty_gradients,
    make_private,
    private_loss,
    resolve_grad_sample_mode,
    train_private,
)
from fedpeft.privacy.planning import planned_steps
from fedpeft.training.batches import encode_classification, encode_prompt_response, trim_batch
from fedpeft.training.trainer import batch_loss

TASKS = ["classification", "causal-lm"]


def _setup(task: str, n: int = 12):
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama", task=task, quantization="none"), 3)
    model = wrap_with_peft(base, PeftConfig(r=4, dropout=0.0), task)
    torch.manual_seed(0)  # the same adapter every call: neighbouring datasets must meet the same model
    with torch.no_grad():  # non-zero B so that every LoRA tensor has a gradient
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    texts = tuple(f"ticket {i} about a late fee" if i % 2 else f"cannot log in, case {i}" for i in range(n))
    if task == "classification":
        data = encode_classification(texts, tuple(i % 3 for i in range(n)), tokenizer, 24)
    else:
        data = encode_prompt_response(texts, tuple(("billing", "access")[i % 2] for i in range(n)), tokenizer, 24)
    return model, data


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task", TASKS)
def test_no_noise_and_no_clipping_equals_plain_sgd(task):
    model, data = _setup(task)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    batch = trim_batch(data.input_ids, data.attention_mask, data.labels)
    model.train()
    batch_loss(model, batch, task)[0].backward()
    plain = {n: p.grad.detach().clone() for n, p in _trainable(model).items()}
    model.zero_grad()

    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=1.0)
    private = make_private(model, optimizer, data, len(data), dp=DpSettings(0.0, 1e6), poisson_sampling=False)
    private.module.train()
    batch_loss(private.module, batch, task)[0].backward()
    private.optimizer.step()
    private.module._close()
    for name, param in _trainable(model).items():
        assert torch.allclose(before[name] - param.detach(), plain[name], atol=1e-6, rtol=1e-4), name


def _summed_clipped_gradient(task: str, data, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the clipped per-example gradients, each example's unclipped gradient norm)."""
    model, _ = _setup(task)
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=1.0)
    private = make_private(model, optimizer, data, len(data), dp=DpSettings(0.0, clip, "hooks"), poisson_sampling=False)
    private.module.train()
    batch_loss(private.module, trim_batch(data.input_ids, data.attention_mask, data.labels), task)[0].backward()
    per_example = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in private.optimizer.params]).norm(dim=0)
    private.optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in private.optimizer.params])
    private.module._close()
    return summed, per_example


@pytest.mark.parametrize("task", TASKS)
def test_replacing_one_example_moves_the_clipped_sum_by_at_most_2c(task):
    clip = 0.01  # far below the per-example gradient norms, so every example is clipped
    _, data = _setup(task)
    _, other = _setup(task, n=13)
    neighbour = type(data)(data.input_ids.clone(), data.attention_mask.clone(), data.labels.clone())
    neighbour.input_ids[0], neighbour.attention_mask[0] = other.input_ids[12], other.attention_mask[12]
    neighbour.labels[0] = other.labels[12]
    (a, norms), (b, _) = _summed_clipped_gradient(task, data, clip), _summed_clipped_gradient(task, neighbour, clip)
    assert float(norms.min()) > clip, "every example must actually be clipped for this check to mean anything"
    assert float((a - b).norm()) <= 2 * clip * (1 + 1e-4)
    assert float((a - b).norm()) > 0.1 * clip, "the replaced example must matter"


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_empty_poisson_batch_still_takes_a_noisy_step(mode):
    model, data = _setup("classification")
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=1.0)
    private = make_private(model, optimizer, data, 4, dp=DpSettings(1.0, 1.0, mode))
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    private.optimizer.zero_grad(set_to_none=True)
    _empty_gradients(private)
    private.optimizer.step()
    private.module._close()
    assert all(not torch.equal(before[n], p.detach()) for n, p in _trainable(model).items())


def _one_clipped_step(task: str, mode: str, clip: float) -> dict[str, torch.Tensor]:
    model, data = _setup(task)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=1.0)
    private = make_private(model, optimizer, data, len(data), dp=DpSettings(0.0, clip, mode), poisson_sampling=False)
    private.module.train()
    private_loss(private, trim_batch(data.input_ids, data.attention_mask, data.labels), task).backward()
    private.optimizer.step()
    private.module._close()
    return {n: before[n] - p.detach() for n, p in _trainable(model).items()}


@pytest.mark.parametrize("task", TASKS)
def test_ghost_clipping_takes_the_same_clipped_step_as_per_sample_hooks(task):
    hooks, ghost = _one_clipped_step(task, "hooks", 0.05), _one_clipped_step(task, "ghost", 0.05)
    for name, step in hooks.items():
        assert torch.allclose(ghost[name], step, atol=1e-6, rtol=1e-3), name


def test_auto_mode_is_hooks_on_cpu():
    assert resolve_grad_sample_mode("auto") == "hooks"  # fastest measured on CPU and on an H100
    assert resolve_grad_sample_mode("functorch") == "functorch"


def test_train_private_takes_the_planned_steps_and_leaves_no_hooks():
    model, data = _setup("causal-lm")
    cfg = TrainConfig(batch_size=4, local_epochs=2, learning_rate=1e-2)
    result = train_private(model, data, cfg, "causal-lm", seed=0, dp=DpSettings(1.0, 1.0))
    assert result.steps == planned_steps(len(data), 4, 2)[1] == 2 * 3
    assert result.sample_rate == pytest.approx(4 / 12)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert type(model).__name__ == "PeftModelForCausalLM"
