"""A linear probe on the frozen base's features (the head alone trains): the DP-first phase.

The literature's first lever for private fine-tuning of small data is an objective aligned with pretraining on
few parameters (Li et al. 2022; Yu et al. 2022): a linear head on frozen, normalised features. Each site computes
its features once (``fedpeft.training.probe``, cached beside its ledger, never sent), so a round costs milliseconds
and a private federation can afford the hundreds of rounds that one DP step per round needs
(``privacy.dp_mode = "distributed"``). What travels is the head ``probe.weight``: (classes, hidden + 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fedpeft.audit.payload import model_fingerprint
from fedpeft.config import RunConfig, TrainConfig
from fedpeft.config.checks import Rule
from fedpeft.errors import ModelError
from fedpeft.methods.base import DP_NONE, FederatedMethod, register_method
from fedpeft.methods.partial import PartialConfig
from fedpeft.models.adapter_state import PARTIAL_ATTRIBUTE
from fedpeft.training import probe
from fedpeft.training.batches import EncodedData
from fedpeft.training.trainer import EvalResult, TrainResult

WEIGHT = "probe.weight"


class LinearProbe(nn.Module):
    """The frozen base and a zero-initialised linear head over its pooled features (bias as the last column)."""

    def __init__(self, base: Any, classes: int) -> None:
        super().__init__()
        self.base = base
        self.config = base.config
        self.probe = nn.Linear(int(base.config.hidden_size) + 1, classes, bias=False)
        nn.init.zeros_(self.probe.weight)


@register_method
class Probe(FederatedMethod):
    name = "probe"
    summary = "a linear head on frozen, mean-pooled features (computed once per site); the DP-first phase"
    dp_sgd = DP_NONE  # no Opacus: its DP is the closed-form distributed step (privacy.dp_mode = "distributed")
    distributed_dp = True
    label_words = False  # the probe is a head on pooled features, not the LM head

    def rules(self, cfg: RunConfig) -> list[Rule]:
        return [("model.task", cfg.model.task, cfg.model.task == "classification",
                 "the probe is a classification head; use model.task = 'classification'"),
                ("peft.head", cfg.peft.head, cfg.peft.head == "aggregate",
                 "the probe is the head: it aggregates (peft.head = 'aggregate')"),
                ("privacy.dp_mode", cfg.privacy.dp_mode, not cfg.privacy.dp or cfg.privacy.dp_mode == "distributed",
                 "the probe's DP is one closed-form DP step per round across the sites; set "
                 "privacy.dp_mode = 'distributed' (with federation.secure_aggregation = true)"),
                self.label_words_rule(cfg)]

    def wrap(self, model: Any, seed: int = 0) -> Any:
        classes = int(getattr(model.config, "num_labels", 0) or 0)
        if classes < 2:
            raise ModelError(f"peft.method = 'probe' needs a classification base with at least 2 labels, got {classes}")
        wrapped = LinearProbe(model, classes)
        setattr(wrapped, PARTIAL_ATTRIBUTE, PartialConfig(self.name, 0, self.task))
        return wrapped

    def load_saved(self, base: Any, adapter_dir: str) -> Any:
        import torch
        from safetensors.torch import load_file

        wrapped = self.wrap(base)
        saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        with torch.no_grad():
            wrapped.probe.weight.copy_(saved[WEIGHT])
        return wrapped

    def site_data(self, model: Any, data: EncodedData, *, cache_dir: Path, settings: dict[str, Any]) -> Any:
        fingerprint = getattr(model, "base_fingerprint", None)
        if fingerprint is None:  # once per process: hashing the base's weights is not free
            fingerprint = model.base_fingerprint = model_fingerprint(model.base)
        return probe.cached_features(model.base, data, cache_dir=cache_dir, base_fingerprint=fingerprint,
                                     settings=settings)

    def local_train(self, model: Any, data: Any, cfg: TrainConfig, *, seed: int, proximal_mu: float) -> TrainResult:
        import torch

        weight, result = probe.train(model.probe.weight.detach(), data, learning_rate=cfg.learning_rate,
                                     epochs=cfg.local_epochs, batch_size=cfg.batch_size, seed=seed)
        with torch.no_grad():
            model.probe.weight.copy_(weight)
        return result

    def local_evaluate(self, model: Any, data: Any, cfg: TrainConfig) -> EvalResult:
        return probe.evaluate(model.probe.weight.detach(), data)

    def clipped_gradient_sum(self, model: Any, data: Any, rows: Any, clip: float) -> Any:
        import torch

        index = torch.as_tensor(rows, dtype=torch.long)
        weight = model.probe.weight.detach()
        return probe.clipped_gradient_sum(weight, data.x[index], data.labels[index], clip).flatten().numpy()
