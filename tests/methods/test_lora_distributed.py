"""LoRA under distributed DP: each sampled row's gradient of its own loss w.r.t. A and B, clipped and summed in wire
order, for a causal LM's label words and for SFT; what cannot give such a gradient is refused at config time; a
real federation releases only the noisy sum and accounts Skellam releases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.config import ModelConfig, PeftConfig
from fedpeft.errors import ConfigError, ModelError
from fedpeft.methods import method_for
from fedpeft.models.adapter_state import get_wire_state, trainable_adapter_names, wire_weight_modules
from fedpeft.models.label_words import wrap_label_words
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.site_budget import site_ledger_path
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.secagg.vector import unflatten
from fedpeft.training import per_example
from fedpeft.training.batches import encode_classification, encode_prompt_response, trim_batch
from fedpeft.training.trainer import batch_loss, example_losses

ROWS = 9
WORDS = ("billing", "access", "appointments")


def _setup(task: str, lora_mode: str = "fedit", **peft):
    cfg = ModelConfig(name="tiny-llama", task="causal-lm")
    lm, tokenizer = load_base_model(cfg, 0)
    texts = tuple(f"ticket {i} about " + "my account " * (i % 3) for i in range(ROWS))
    if task == "classification":  # label words on the LM head: no new head
        lm = wrap_label_words(lm, tokenizer, template="{text}\nAnswer:", words=WORDS, num_labels=3)
        data = encode_classification(texts, tuple(i % 3 for i in range(ROWS)), tokenizer, 24)
    else:
        data = encode_prompt_response(texts, tuple(f"reply {i}" for i in range(ROWS)), tokenizer, 24)
    method = method_for(PeftConfig(method="lora", r=4, lora_mode=lora_mode, **peft), task)
    model = method.wrap(lm, 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make A's gradients 0: move both
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return method, model, data


def _loop_sum(model, data, rows, clip, task):
    """Each row alone through autograd, its whole gradient clipped, summed, in sorted wire-name order."""
    modules = wire_weight_modules(model)
    params = [modules[name].weight for name in sorted(modules)]
    total = [torch.zeros_like(p) for p in params]
    model.eval()
    for i in rows:
        batch = trim_batch(data.input_ids[i:i + 1], data.attention_mask[i:i + 1], data.labels[i:i + 1])
        grads = torch.autograd.grad(batch_loss(model, batch, task)[0], params)
        factor = min(1.0, clip / float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return torch.cat([t.flatten() for t in total]).numpy()


@pytest.mark.parametrize(("task", "lora_mode"), [("classification", "fedit"), ("classification", "ffa"),
                                                 ("causal-lm", "fedit")])
def test_the_clipped_sum_is_a_loop_over_single_rows_each_clipped(task, lora_mode, monkeypatch):
    monkeypatch.setattr(per_example, "MICRO_BATCH", 4)
    method, model, data = _setup(task, lora_mode)
    rows = [0, 1, 3, 4, 6, 8]  # two micro-batches
    summed = method.clipped_gradient_sum(model, data, rows, 0.05)
    expected = _loop_sum(model, data, rows, 0.05, task)
    wire_state = get_wire_state(model)
    assert summed.shape == expected.shape == (sum(t.numel() for t in wire_state.values()),)
    assert np.allclose(summed, expected, atol=1e-6, rtol=1e-4)
    assert np.abs(summed).max() > 0
    # the vector unflattens under the wire names (what the server decodes), each tensor its module's gradient
    assert set(unflatten(summed, wire_state)) == set(wire_state) == trainable_adapter_names(model)
    if lora_mode == "ffa":
        assert not any("lora_A" in name for name in wire_state)


def test_each_rows_loss_is_what_the_batch_loss_averages():
    for task in ("classification", "causal-lm"):
        _, model, data = _setup(task)
        model.eval()  # LoRA's dropout off, as when the gradients are taken
        batch = trim_batch(data.input_ids, data.attention_mask, data.labels)
        with torch.no_grad():
            torch.testing.assert_close(example_losses(model, batch, task).mean(), batch_loss(model, batch, task)[0],
                                       atol=1e-6, rtol=1e-5)


def test_a_travelling_tensor_that_is_not_a_linear_weight_is_refused():
    method, model, data = _setup("causal-lm", use_dora=True)  # DoRA's magnitudes (config time refuses it too)
    with pytest.raises(ModelError, match=r"lora_magnitude_vector' \(DoraLinearLayer\) is not a linear layer"):
        method.clipped_gradient_sum(model, data, [0], 1.0)


def _config(tmp_path, **model):
    return {
        "model": {"name": "tiny-llama", "max_length": 32, "classifier": "label-words",
                  "label_words": [f"{t} {u}" for t in WORDS for u in ("urgent", "routine")], **model},
        "peft": {"method": "lora", "r": 4},
        "federation": {"rounds": 2, "num_sites": 3, "secure_aggregation": True, "aggregation": "server-sgd"},
        "data": {"synthetic_examples": 180},
        "secagg": {"max_weight": 100},
        "privacy": {"dp": True, "dp_mode": "distributed", "target_epsilon": 8.0},
        "run": {"name": "lora-ddp", "out_dir": str(tmp_path)},
    }


def test_what_gives_no_single_gradient_is_refused_with_the_fix(tmp_path):
    head = _config(tmp_path, classifier="head")
    del head["model"]["label_words"]
    with pytest.raises(ConfigError, match=r"model\.classifier.*label words.*probe-lora"):
        from_mapping(head)
    ia3 = _config(tmp_path)
    ia3["peft"] = {"method": "ia3"}
    with pytest.raises(ConfigError, match=r"'peft\.method' = 'ia3'.*each sampled example's gradient.*'lora'"):
        from_mapping(ia3)
    derived = _config(tmp_path)
    derived["federation"]["rounds"] = 0
    with pytest.raises(ConfigError, match=r"'federation\.rounds' = 0.*calibrated for the probe"):
        from_mapping(derived)
    ranks = _config(tmp_path)
    ranks["peft"]["site_ranks"] = "2,4,4"
    with pytest.raises(ConfigError, match=r"peft\.site_ranks.*leave peft\.site_ranks empty"):
        from_mapping(ranks)


@pytest.mark.slow
def test_a_label_words_federation_under_distributed_dp_releases_sums_and_accounts_skellam_rounds(tmp_path):
    from fedpeft.simulations.engine import simulate

    cfg = from_mapping(_config(tmp_path))
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [(r["aggregated"], r["sites_returned"], r["failures"]) for r in rounds[1:]] == [(True, 3, {})] * 2
    for site in ("0", "1", "2"):
        assert 0 < rounds[1]["site_epsilon"][site] < rounds[2]["site_epsilon"][site] <= 8.0 + 1e-6
        entries = PrivacyLedger(site_ledger_path(cfg, site)).entries
        assert [(e.round, e.mechanism) for e in entries] == [(1, "skellam"), (2, "skellam")]
