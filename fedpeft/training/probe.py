"""A linear probe on frozen features: the phase where DP noise costs least (the head has few parameters, the
features are the pretrained model's own).

Features are the frozen base's last hidden state, mean-pooled over the attention mask and L2-normalised, with a
constant 1 appended for the bias, so the head is one matrix ``W`` of shape (classes, hidden + 1). A site computes
them once and caches them beside its ledger (never sent): a DP round then costs milliseconds.

The per-example gradient of softmax cross-entropy is ``(p_i - y_i) ⊗ x_i``: its norm is ``|p_i - y_i| * |x_i|``,
so clipping to C is a per-row scale and the clipped sum is one matrix product -- no per-sample-gradient hooks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.io.atomic import write_bytes_atomic
from fedpeft.training.batches import EncodedData, iterate_batches
from fedpeft.training.trainer import EvalResult, TrainResult

FEATURE_BATCH = 64


@dataclass(frozen=True)
class Features:
    x: Any  # (N, hidden + 1) float32: normalised features and a constant 1
    labels: Any  # (N,) long

    def __len__(self) -> int:
        return int(self.x.shape[0])


def backbone(model: Any) -> Any:
    """The transformer under a task head (BertModel under BertForSequenceClassification, LlamaModel under ...)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def compute_features(model: Any, data: EncodedData) -> Features:
    """Mean-pooled, L2-normalised last hidden states of every row, plus the bias column."""
    import torch

    encoder = backbone(model)
    encoder.eval()
    rows = []
    with torch.no_grad():
        for batch in iterate_batches(data, FEATURE_BATCH):
            rows.append(pooled_features(encoder, batch["input_ids"], batch["attention_mask"]).cpu())
    x = torch.cat(rows) if rows else torch.zeros(0, int(model.config.hidden_size) + 1)
    return Features(x, data.labels.clone())


def pooled_features(encoder: Any, input_ids: Any, attention_mask: Any) -> Any:
    """The rows' features (mean-pooled, L2-normalised last hidden state, then a constant 1), differentiable: the
    one formula for cached features and for LoRA's forward pass under the head (``fedpeft.training.per_example``)."""
    import torch

    device = next(encoder.parameters()).device
    mask = attention_mask.to(device)
    hidden = encoder(input_ids=input_ids.to(device), attention_mask=mask).last_hidden_state.float()
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    x = torch.nn.functional.normalize(pooled, dim=-1)
    return torch.cat([x, torch.ones(len(x), 1, device=x.device)], dim=1)


def data_digest(data: EncodedData) -> str:
    """SHA-256 of the encoded rows and labels: another data file, split or tokenizer gives another digest."""
    digest = hashlib.sha256()
    for tensor in (data.input_ids, data.attention_mask, data.labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def feature_settings(model_name: str, max_length: int, tokenizer: Any) -> dict[str, Any]:
    """What, besides the base's weights and the data, decides the features: one cache key for every caller."""
    return {"model": model_name, "max_length": max_length, "tokenizer": type(tokenizer).__name__,
            "vocab": len(tokenizer)}


def cached_features(model: Any, data: EncodedData, *, cache_dir: Path, base_fingerprint: str,
                    settings: dict[str, Any]) -> Features:
    """The rows' features from the site's cache, computed (and written atomically) on first use.

    The key covers the base's weights (fingerprint), the tokenizer settings and the encoded data itself, so any
    change to one of them computes the features again instead of reusing stale ones.
    """
    from safetensors.torch import load, save

    key = hashlib.sha256(json.dumps({"base": base_fingerprint, "settings": settings, "data": data_digest(data)},
                                    sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir / "features" / f"{key}.safetensors"
    if path.is_file():
        stored = load(path.read_bytes())
        return Features(stored["x"], stored["labels"])
    features = compute_features(model, data)
    write_bytes_atomic(path, save({"x": features.x.contiguous(), "labels": features.labels.contiguous()}))
    return features


def residuals(weight: Any, x: Any, labels: Any) -> Any:
    """p - y for each row (softmax probabilities minus the one-hot label)."""
    import torch

    probabilities = torch.softmax(x @ weight.T, dim=-1)
    return probabilities - torch.nn.functional.one_hot(labels, weight.shape[0]).to(probabilities.dtype)


def clip_factors(r: Any, x: Any, clip: float) -> Any:
    """min(1, C / |g_i|) with |g_i| = |r_i| |x_i|: the scale that clips each row's gradient to norm C."""
    norms = r.norm(dim=1) * x.norm(dim=1)
    return (clip / norms.clamp(min=1e-12)).clamp(max=1.0)


def clipped_gradient_sum(weight: Any, x: Any, labels: Any, clip: float) -> Any:
    """Sum over the rows of the per-example gradients, each clipped to L2 norm ``clip``: shape of ``weight``."""
    r = residuals(weight, x, labels)
    return (r * clip_factors(r, x, clip)[:, None]).T @ x


def evaluate(weight: Any, features: Features) -> EvalResult:
    import torch

    if len(features) == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    logits = features.x @ weight.T
    loss = float(torch.nn.functional.cross_entropy(logits, features.labels))
    accuracy = float((logits.argmax(-1) == features.labels).float().mean())
    return EvalResult(loss, accuracy, len(features))


def train(weight: Any, features: Features, *, learning_rate: float, epochs: int, batch_size: int,
          seed: int) -> tuple[Any, TrainResult]:
    """Non-private local training of the head (SGD with momentum on the mean loss); returns the new weight."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    w, velocity, losses = weight.clone(), torch.zeros_like(weight), []
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            rows = order[start: start + batch_size]
            x, y = features.x[rows], features.labels[rows]
            r = residuals(w, x, y)
            losses.append(float(torch.nn.functional.cross_entropy(x @ w.T, y)))
            velocity = 0.9 * velocity + r.T @ x / len(rows)
            w = w - learning_rate * velocity
    mean = sum(losses) / len(losses) if losses else float("nan")
    return w, TrainResult(mean, len(losses), len(features))
