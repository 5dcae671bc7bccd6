"""probe-lora (LP-FT under distributed DP): the head on cached features first, then head and LoRA, one clipped
gradient sum per round whose tensors follow from the round number."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft import wire
from fedpeft.client import distributed as site_distributed
from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import ConfigError, ModelError
from fedpeft.methods import load_saved_adapter, method_for
from fedpeft.methods.probe import WEIGHT
from fedpeft.methods.probe_lora import ProbeLoraData, adapters_are_zero, row_losses
from fedpeft.models.adapter_state import get_wire_state, set_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.privacy import distributed
from fedpeft.runs.checkpoint import save_global_adapter
from fedpeft.secagg.vector import unflatten
from fedpeft.strategies.server_sgd import ServerSgd
from fedpeft.training import per_example, probe
from fedpeft.training.batches import encode_classification, trim_batch

ROWS = 10


def _setup(lora_mode: str = "fedit", seed: int = 0, rounds: int = 4, probe_rounds: int = 2):
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama"), 3)
    method = method_for(PeftConfig(method="probe-lora", r=4, lora_mode=lora_mode, probe_rounds=probe_rounds),
                        "classification", rounds=rounds)
    model = method.wrap(base, seed)
    texts = tuple(f"ticket {i} " + "word " * (i % 4) for i in range(ROWS))
    encoded = encode_classification(texts, tuple(i % 3 for i in range(ROWS)), tokenizer, 16)
    return method, model, ProbeLoraData(probe.compute_features(model.base, encoded), encoded)


def _perturb(model, scale: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _loop_sum(model, data, rows, clip):
    """Each row alone through autograd, its whole gradient clipped, summed: the definition."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i in rows:
        e = data.encoded
        batch = trim_batch(e.input_ids[i:i + 1], e.attention_mask[i:i + 1], e.labels[i:i + 1])
        grads = torch.autograd.grad(row_losses(model, batch).sum(), list(params.values()))
        factor = min(1.0, clip / float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
        for name, g in zip(params, grads, strict=True):
            total[name] += g * factor
    return torch.cat([total[n].flatten() for n in sorted(total)]).numpy()


@pytest.mark.parametrize("lora_mode", ["fedit", "ffa"])
def test_the_clipped_per_example_sum_is_a_loop_over_single_rows_each_clipped(lora_mode, monkeypatch):
    monkeypatch.setattr(per_example, "MICRO_BATCH", 4)
    method, model, data = _setup(lora_mode)
    _perturb(model)
    rows = [0, 2, 3, 5, 7, 8, 9]  # two micro-batches
    with method.training(model, {wire.SERVER_ROUND: 3}):
        summed = method.clipped_gradient_sum(model, data, rows, 0.05)
    expected = _loop_sum(model, data, rows, 0.05)
    assert summed.shape == expected.shape == (sum(t.numel() for t in get_wire_state(model).values()),)
    assert np.allclose(summed, expected, atol=1e-6, rtol=1e-4)
    if lora_mode == "ffa":
        assert not any("lora_A" in name for name in get_wire_state(model))


def test_the_probe_rounds_upload_the_head_alone_from_the_cached_features():
    method, model, data = _setup()
    state = get_wire_state(model)
    assert list(method.gradient_template(state, 2)) == [WEIGHT]
    assert set(method.gradient_template(state, 3)) == set(state)
    assert adapters_are_zero(model)  # B = 0: the adapted base computes the frozen base's features exactly
    assert torch.allclose(probe.compute_features(model.base, data.encoded).x, data.features.x)
    with torch.no_grad():
        model.probe.weight.normal_()
    with method.training(model, {wire.SERVER_ROUND: 1}):
        summed = method.clipped_gradient_sum(model, data, [1, 4], 0.5)
    expected = probe.clipped_gradient_sum(model.probe.weight.detach(), data.features.x[[1, 4]],
                                          data.features.labels[[1, 4]], 0.5)
    assert np.allclose(summed, expected.flatten().numpy())


def test_a_round_needs_its_number():
    method, model, data = _setup()
    with pytest.raises(ModelError, match="round"):
        method.clipped_gradient_sum(model, data, [0], 1.0)
    with pytest.raises(ModelError, match="round number"), method.training(model, {}):
        pass


def _step(method, model, data, server_round, lr=0.5):
    state = get_wire_state(model)
    with method.training(model, {wire.SERVER_ROUND: server_round}):
        summed = method.clipped_gradient_sum(model, data, list(range(ROWS)), 1.0)
    rule = ServerSgd(server_learning_rate=lr)
    new = rule.aggregate(state, unflatten(summed, method.gradient_template(state, server_round)), float(ROWS))
    set_adapter_state(model, new)
    return state, new


def test_the_probe_rounds_change_only_the_head_and_the_lora_rounds_change_lora_too():
    method, model, data = _setup()
    before, after = _step(method, model, data, 1)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {WEIGHT} and adapters_are_zero(model)
    before, after = _step(method, model, data, 3)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert WEIGHT in changed and any("lora_B" in name for name in changed) and not adapters_are_zero(model)
    # the features now go through the adapters: evaluation recomputes them instead of reading the cache
    result = method.local_evaluate(model, data, None)
    fresh = probe.evaluate(model.probe.weight.detach(), probe.compute_features(model.base, data.encoded))
    assert result == fresh


def test_a_tiny_noise_release_steps_as_the_plain_clipped_gradient_does():
    cfg = from_mapping({"model": {"name": "tiny-llama"}, "peft": {"method": "probe-lora", "probe_rounds": 1},
                        "federation": {"rounds": 2, "num_sites": 3, "secure_aggregation": True,
                                       "aggregation": "server-sgd"},
                        "secagg": {"max_weight": 100}, "privacy": {"dp": True, "dp_mode": "distributed"}})
    method, model, data = _setup(rounds=2, probe_rounds=1)
    _perturb(model, 0.05)
    state = get_wire_state(model)
    template = method.gradient_template(state, 2)
    base = distributed.plan(cfg, dim=sum(t.numel() for t in template.values()), cohort=1, max_rows=100)
    plan = distributed.with_noise(base, 1e-9, num_sites=1, max_rows=100)  # Skellam of variance 1e-9: zero noise
    with method.training(model, {wire.SERVER_ROUND: 2}):
        values = site_distributed.release(method, model, data, plan, share=1e-9)
    decoded, expected_batch = distributed.decode(values.astype(np.uint64) % (1 << plan.bits), plan)
    assert expected_batch == ROWS  # q = 1: every row
    noisy = ServerSgd(server_learning_rate=2.0).aggregate(state, unflatten(decoded, template), expected_batch)
    plain = unflatten(_loop_sum(model, data, range(ROWS), cfg.privacy.max_grad_norm), template)
    for name in state:
        step = state[name] - 2.0 * plain[name] / ROWS
        assert torch.allclose(noisy[name], step, atol=2.0 / plan.scale)  # rounding: under one unit per value


def test_a_checkpoint_loads_with_its_frozen_a_rebuilt_from_the_seed(tmp_path):
    method, model, data = _setup("ffa", seed=7)
    _perturb(model)
    directory = save_global_adapter(tmp_path, 1, get_wire_state(model), model.fedpeft_partial)
    base, _ = load_base_model(ModelConfig(name="tiny-llama"), 3)
    loaded = load_saved_adapter(base, directory)
    batch = trim_batch(data.encoded.input_ids, data.encoded.attention_mask, data.encoded.labels)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(row_losses(model, batch), row_losses(loaded, batch))


def test_the_site_caches_the_frozen_bases_features_whatever_lora_holds(tmp_path):
    method, model, data = _setup("ffa")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    _perturb(model)
    cached = method.site_data(model, data.encoded, cache_dir=tmp_path, settings={})
    assert not adapters_are_zero(model)
    assert torch.allclose(cached.features.x, data.features.x, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # FFA's A stays frozen


def test_local_training_without_dp_follows_the_phases():
    from fedpeft.config import TrainConfig

    method, model, data = _setup()
    cfg = TrainConfig(learning_rate=0.5, batch_size=4)
    for server_round, lora_moves in ((1, False), (3, True)):
        before = get_wire_state(model)
        with method.training(model, {wire.SERVER_ROUND: server_round}):
            method.local_train(model, data, cfg, seed=0, proximal_mu=0.0)
        after = get_wire_state(model)
        assert not torch.equal(before[WEIGHT], after[WEIGHT])
        assert any(not torch.equal(before[n], after[n]) for n in before if n != WEIGHT) == lora_moves


def _config(**peft):
    return {"model": {"name": "tiny-llama"}, "peft": {"method": "probe-lora", **peft},
            "federation": {"rounds": 4, "num_sites": 3, "secure_aggregation": True, "aggregation": "server-sgd"},
            "privacy": {"dp": True, "dp_mode": "distributed"}}


def test_the_config_rules():
    cfg = from_mapping(_config(probe_rounds=2, lora_mode="ffa"))
    assert method_for(cfg.peft, "classification", rounds=4).probe_rounds == 2
    assert method_for(from_mapping(_config()).peft, "classification", rounds=4).probe_rounds == 2  # 0: half
    with pytest.raises(ConfigError, match="probe_rounds"):
        from_mapping(_config(probe_rounds=4))
    with pytest.raises(ConfigError, match="probe_rounds"):
        from_mapping(_config(probe_rounds=-1))
    with pytest.raises(ConfigError, match="probe_rounds"):
        from_mapping({**_config(), "peft": {"method": "probe", "probe_rounds": 2}})
    with pytest.raises(ConfigError, match="dp_mode"):
        from_mapping({**_config(), "privacy": {"dp": True}})
