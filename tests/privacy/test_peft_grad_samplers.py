"""Per-example gradients for IA3 and AdaLoRA equal autograd's, example by example, and DP-SGD trains them."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.dp_sgd import DpSettings, make_private
from fedpeft.training.batches import encode_classification, encode_prompt_response, trim_batch
from fedpeft.training.trainer import batch_loss

CASES = [("ia3", "tiny-llama", "causal-lm"), ("ia3", "minilm", "classification"),
         ("adalora", "tiny-llama", "causal-lm"), ("adalora", "minilm", "classification")]


def _setup(method: str, name: str, task: str, n: int = 5):
    base, tokenizer = load_base_model(ModelConfig(name=name, task=task, quantization="none"), 3)
    model = wrap_with_peft(base, PeftConfig(method=method, r=2, adalora_init_r=3, dropout=0.0), task)
    for module in model.modules():  # BERT's own dropout would differ between the batch and the one-row passes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(0)
    with torch.no_grad():  # away from the init (IA3 ones, AdaLoRA's E zeros) so every tensor has a gradient
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    texts = tuple(f"ticket {i} about a late fee" if i % 2 else f"cannot log in, case {i}" for i in range(n))
    if task == "classification":
        data = encode_classification(texts, tuple(i % 3 for i in range(n)), tokenizer, 16)
    else:
        data = encode_prompt_response(texts, tuple(("billing", "access")[i % 2] for i in range(n)), tokenizer, 16)
    return model, data


def _per_example_autograd(model, data, task):
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(len(data)):
        model.zero_grad()
        one = trim_batch(data.input_ids[i:i + 1], data.attention_mask[i:i + 1], data.labels[i:i + 1])
        batch_loss(model, one, task)[0].backward()
        rows.append({n: p.grad.detach().clone() for n, p in trainable.items()})
    model.zero_grad()
    return {n: torch.stack([row[n] for row in rows]) for n in trainable}


@pytest.mark.parametrize("method,name,task", CASES)
def test_per_example_gradients_equal_autograd_example_by_example(method, name, task):
    model, data = _setup(method, name, task)
    model.train()
    expected = _per_example_autograd(model, data, task)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    private = make_private(model, torch.optim.SGD(list(trainable.values()), lr=0.0), data, len(data),
                           dp=DpSettings(0.0, 1e6), poisson_sampling=False)
    batch_loss(private.module, trim_batch(data.input_ids, data.attention_mask, data.labels), task)[0].backward()
    checked = 0
    for param_name, param in trainable.items():
        if "modules_to_save" in param_name:
            continue  # the head is an nn.Linear: Opacus' own sampler
        assert param.grad_sample is not None, param_name
        assert torch.allclose(param.grad_sample, expected[param_name], rtol=1e-3, atol=1e-6), param_name
        checked += 1
    private.module._close()
    assert checked >= 4


def test_hooks_are_removed_with_opacus_hooks():
    model, data = _setup("ia3", "tiny-llama", "causal-lm")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(trainable, lr=0.0), data, len(data), dp=DpSettings(0.0, 1.0),
                           poisson_sampling=False)
    private.module._close()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before
