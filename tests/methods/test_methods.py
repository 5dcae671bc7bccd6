"""Every PEFT method crosses the peft boundary the same way: the trainable tensors out and back in, exactly."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import ModelError
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import (
    get_wire_state,
    set_adapter_state,
    untravelled_trainable,
)
from fedpeft.models.loader import load_base_model

METHODS = [PeftConfig(method="ia3"), PeftConfig(method="adalora", r=2, adalora_init_r=4),
           PeftConfig(use_dora=True, r=4), PeftConfig(use_rslora=True, r=4),
           PeftConfig(method="prompt-tuning", virtual_tokens=4), PeftConfig(method="p-tuning", virtual_tokens=4),
           PeftConfig(method="prefix-tuning", virtual_tokens=4), PeftConfig(method="p-tuning-v2", virtual_tokens=4),
           PeftConfig(method="bottleneck", r=4), PeftConfig(method="freeze", trainable_blocks=1),
           PeftConfig(method="full")]


def _wrapped(peft: PeftConfig, task: str = "classification", seed: int = 0, name: str = "tiny-llama"):
    base, _ = load_base_model(ModelConfig(name=name, task=task, quantization="none"), 6)
    return wrap_with_peft(base, peft, task, seed)


# Every method on both bases of the table test: the tiny Llama as a causal LM and MiniLM as a classifier.
BASES = [("tiny-llama", "causal-lm"), ("minilm", "classification")]
UNSUPPORTED = {("bitfit", "tiny-llama")}  # Llama-family blocks have no biases
EVERY_METHOD = [PeftConfig(), PeftConfig(method="bitfit"), *METHODS]


def _method_id(peft: PeftConfig) -> str:
    return peft.method + ("-dora" * peft.use_dora) + ("-rs" * peft.use_rslora)


@pytest.mark.parametrize("base", BASES, ids=lambda b: b[0])
@pytest.mark.parametrize("peft", EVERY_METHOD, ids=_method_id)
def test_the_wire_state_is_every_trainable_tensor_and_round_trips(peft, base):
    name, task = base
    if (peft.method, name) in UNSUPPORTED:
        with pytest.raises(ModelError):
            _wrapped(peft, task, name=name)
        return
    model = _wrapped(peft, task, name=name)
    wire = get_wire_state(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert wire and sum(t.numel() for t in wire.values()) == trainable, "exactly the trainable values travel"
    assert not untravelled_trainable(model)
    changed = {key: tensor + 0.5 for key, tensor in wire.items()}
    other = _wrapped(peft, task, seed=1, name=name)
    set_adapter_state(other, changed)
    assert all(torch.equal(get_wire_state(other)[key], changed[key]) for key in changed)


def test_a_trainable_tensor_outside_the_adapter_is_detected():
    model = _wrapped(PeftConfig())
    next(p for n, p in model.named_parameters() if "embed_tokens" in n).requires_grad_(True)
    assert any("embed_tokens" in name for name in untravelled_trainable(model))


def test_prompt_methods_are_saved_in_peft_format():
    from fedpeft.composition import from_mapping
    from fedpeft.server.initial import initial_adapter

    cfg = from_mapping({"model": {"name": "tiny-llama", "task": "causal-lm", "quantization": "none"},
                        "peft": {"method": "p-tuning", "virtual_tokens": 4}})
    initial = initial_adapter(cfg)
    assert all(name.startswith("prompt_encoder.") for name in initial.wire)
    saved = initial.saved_format(initial.wire)
    assert set(saved) == {"prompt_embeddings"} and saved["prompt_embeddings"].shape[0] == 4


class _CacheOnlyLlama(torch.nn.Module):
    """A classifier whose forward (and backbone's) takes the cache under another name, as transformers 5.24's Llama."""

    base_model_prefix = "model"

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("method", ["prefix-tuning", "p-tuning-v2"])
def test_a_prefix_method_is_refused_on_a_model_that_takes_no_past_key_values(method):
    from fedpeft.methods.prompt import check_takes_prefixes

    base, _ = load_base_model(ModelConfig(name="tiny-llama", quantization="none", compute_dtype="fp32"), 3)
    check_takes_prefixes(base, method)  # this release's Llama takes them
    with pytest.raises(ModelError, match=rf"'{method}'.*past_key_values.*constraints.txt"):
        check_takes_prefixes(_CacheOnlyLlama(_CacheOnlyLlama(base.model)), method)
