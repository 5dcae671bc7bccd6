"""The bottleneck adapter: identity at initialisation, the placement it promises, a non-linear adapter that refuses
to merge, a checkpoint that loads back as a bottleneck (not as LoRA), and exact DP-SGD per-example gradients."""

from __future__ import annotations

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import ConfigError, ModelError
from fedpeft.methods import load_saved_adapter, wrap_with_peft
from fedpeft.methods.bottleneck import BottleneckLinear, bottleneck_targets
from fedpeft.models.adapter_state import get_adapter_state, get_wire_state, set_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.dp_sgd import DpSettings, make_private
from fedpeft.training.batches import encode_classification, trim_batch
from fedpeft.training.trainer import batch_loss

TINY = ModelConfig(name="tiny-llama", task="classification", quantization="none")


def _model(placement: str = "both", r: int = 4):
    base, tokenizer = load_base_model(TINY, 3)
    peft = PeftConfig(method="bottleneck", r=r, adapter_placement=placement, dropout=0.0)
    return wrap_with_peft(base, peft, "classification"), tokenizer


def _batch(tokenizer, n: int = 6):
    texts = tuple(f"ticket {i} about a late fee" for i in range(n))
    return encode_classification(texts, tuple(i % 3 for i in range(n)), tokenizer, 16)


def test_the_adapter_starts_as_the_identity_and_sits_where_placed():
    model, tokenizer = _model()
    layers = {name for name, m in model.named_modules() if isinstance(m, BottleneckLinear)}
    assert layers == {f"base_model.model.model.layers.{i}.{p}" for i in range(2)
                      for p in ("self_attn.o_proj", "mlp.down_proj")}
    ffn_only, _ = _model("ffn")
    assert all(name.endswith("down_proj") for name, m in ffn_only.named_modules() if isinstance(m, BottleneckLinear))
    for module in model.modules():
        if isinstance(module, BottleneckLinear):  # down: d -> r, up: r -> d, even where the projection is not square
            down, up = module.lora_A["default"], module.lora_B["default"]
            assert down.in_features == module.out_features == up.out_features and down.out_features == 4
    data = _batch(tokenizer)
    ids, mask = data.input_ids, data.attention_mask
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(adapted, plain)


def test_unknown_architecture_and_bad_placement_are_clear_errors():
    with pytest.raises(ModelError, match="peft.target_modules"):
        bottleneck_targets("gpt2", "both")
    with pytest.raises(ConfigError, match="peft.adapter_placement"):
        from_mapping({"peft": {"method": "bottleneck", "adapter_placement": "everywhere"}})
    with pytest.raises(ConfigError, match="lora_mode"):
        from_mapping({"peft": {"method": "bottleneck", "lora_mode": "ffa"}})


def test_merging_is_refused_and_a_saved_adapter_loads_back_as_a_bottleneck(tmp_path):
    from fedpeft.runs.checkpoint import save_global_adapter

    model, _ = _model()
    state = {name: tensor + 0.1 for name, tensor in get_wire_state(model).items()}
    set_adapter_state(model, state)
    with pytest.raises(ModelError, match="non-linear"):
        model.merge_and_unload()
    saved = save_global_adapter(tmp_path, 1, get_adapter_state(model), model.peft_config["default"])
    fresh, _ = load_base_model(TINY, 3)
    loaded = load_saved_adapter(fresh, saved)
    assert any(isinstance(m, BottleneckLinear) for m in loaded.modules())
    reloaded = get_adapter_state(loaded)
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in get_adapter_state(model).items())


def test_dp_without_noise_or_clipping_equals_plain_gradients():
    model, tokenizer = _model()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    data = _batch(tokenizer)
    batch = trim_batch(data.input_ids, data.attention_mask, data.labels)
    model.train()
    batch_loss(model, batch, "classification")[0].backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    trainable = [p for p in model.parameters() if p.requires_grad]
    private = make_private(model, torch.optim.SGD(trainable, lr=0.0), data, len(data), dp=DpSettings(0.0, 1e6),
                           poisson_sampling=False)
    batch_loss(private.module, batch, "classification")[0].backward()
    private.optimizer.step()
    private.module._close()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, plain[name], rtol=1e-4, atol=1e-7), name
