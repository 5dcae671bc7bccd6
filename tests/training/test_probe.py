"""The linear probe: features are cached per base, tokenizer setting and data; gradients are the closed form."""

from __future__ import annotations

import torch

from fedpeft.config import ModelConfig
from fedpeft.models.loader import load_base_model
from fedpeft.training import probe
from fedpeft.training.batches import encode_classification


def _data(tokenizer, texts=("a b c", "d e f", "g h i", "j k")):
    return encode_classification(tuple(texts), tuple(i % 2 for i in range(len(texts))), tokenizer, 16)


def test_features_are_computed_once_and_recomputed_for_another_base_setting_or_data(tmp_path, monkeypatch):
    base, tokenizer = load_base_model(ModelConfig(name="tiny-llama"), 2)
    calls = []
    real = probe.compute_features
    monkeypatch.setattr(probe, "compute_features", lambda *a: calls.append(1) or real(*a))
    kwargs = {"cache_dir": tmp_path, "base_fingerprint": "base-a", "settings": {"max_length": 16}}
    first = probe.cached_features(base, _data(tokenizer), **kwargs)
    again = probe.cached_features(base, _data(tokenizer), **kwargs)
    assert len(calls) == 1 and torch.equal(first.x, again.x)
    assert torch.allclose(first.x[:, :-1].norm(dim=1), torch.ones(4)) and (first.x[:, -1] == 1).all()
    probe.cached_features(base, _data(tokenizer), **{**kwargs, "base_fingerprint": "base-b"})
    probe.cached_features(base, _data(tokenizer), **{**kwargs, "settings": {"max_length": 32}})
    probe.cached_features(base, _data(tokenizer, ("other", "rows")), **kwargs)
    assert len(calls) == 4


def test_the_clipped_gradient_sum_is_autograds_per_example_gradients_clipped():
    g = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g), torch.randn(3, 5, generator=g)
    expected = torch.zeros_like(w)
    for i in range(6):
        wi = w.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy((x[i:i + 1] @ wi.T), y[i:i + 1]).backward()
        grad = wi.grad
        expected += grad * min(1.0, 0.5 / float(grad.norm()))
    assert torch.allclose(probe.clipped_gradient_sum(w, x, y, 0.5), expected, atol=1e-5)
