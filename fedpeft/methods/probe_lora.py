"""LP-FT under distributed DP: the linear probe first, then LoRA under the same head (Kumar et al., 2022).

A round is one accounted DP release either way (``privacy.dp_mode = "distributed"``), so the budget splits by
rounds: the first ``peft.probe_rounds`` rounds (0: half of ``federation.rounds``) train only the head, on the
features the site cached once -- exact, because LoRA's B starts at zero, so the adapted base computes what the
frozen base does; the rounds after train the head and the LoRA tensors together, each row's whole gradient clipped
to C (``fedpeft.training.per_example``), on features computed through the adapters.

What a round's sum covers follows from the run config and the round number alone (``gradient_template``): the head
in the probe rounds (the same upload, noise and ring as ``probe``), head and LoRA after. So no noise is spent on
tensors that do not train, and every site derives the same vector length the server plans for. The sites learn the
round number from the round's instructions (``training``); the server's ``server-sgd`` steps only what the sum
covers. The model is ``LinearProbe`` over the base with LoRA layers injected (peft's ``inject_adapter_in_model``:
no peft wrapper, so the head is the probe's and no base head travels); what travels is the head and the trainable
LoRA tensors, by parameter name. ``peft.lora_mode = "ffa"`` freezes A (rebuilt from ``run.seed`` at every party):
half the values per round, so half the noise norm. Dropout is not used: gradients and evaluation both use the
deterministic (eval-mode) features.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fedpeft import wire
from fedpeft.audit.payload import model_fingerprint
from fedpeft.config import PeftConfig, RunConfig, TrainConfig
from fedpeft.config.checks import Rule
from fedpeft.errors import ModelError
from fedpeft.messaging import as_int
from fedpeft.methods.base import DP_NONE, FederatedMethod, register_method
from fedpeft.methods.probe import WEIGHT, LinearProbe, Probe
from fedpeft.models.adapter_state import PARTIAL_ATTRIBUTE, AdapterState
from fedpeft.models.peft_model import lora_targets
from fedpeft.models.saved import METHOD_FILE
from fedpeft.training import per_example, probe
from fedpeft.training.batches import EncodedData, iterate_batches
from fedpeft.training.trainer import EvalResult, TrainResult

NAME = "probe-lora"


@dataclass(frozen=True)
class ProbeLoraConfig:
    """Stands where a peft config stands (checkpoints' ``fedpeft.json``, the audit log): enough to rebuild the
    model, including FFA's frozen A from the seed."""

    method: str
    task: str
    r: int
    alpha: float
    lora_mode: str
    target_modules: tuple[str, ...]
    seed: int

    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / METHOD_FILE).write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class ProbeLoraData:
    features: probe.Features  # the frozen base's features: exact while every LoRA B is zero
    encoded: EncodedData  # the tokens, for the rounds whose features go through the adapters

    def __len__(self) -> int:
        return len(self.features)


class _BaseOnly:
    """The base without its adapters, for ``model_fingerprint`` (which reads ``state_dict``): the feature cache's
    key must not change when LoRA does."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.module.state_dict().items() if "lora_" not in k}


@register_method
class ProbeLora(FederatedMethod):
    name = NAME
    summary = "LP-FT: the probe's head for peft.probe_rounds rounds, then LoRA under it (distributed DP throughout)"
    dp_sgd = DP_NONE  # its DP is the distributed step (privacy.dp_mode = "distributed")
    distributed_dp = True
    label_words = False  # its head is the probe's, on pooled features

    def __init__(self, peft: PeftConfig, *, task: str, rounds: int = 1) -> None:
        super().__init__(peft, task=task, rounds=rounds)
        self._lora_round: bool | None = None  # inside ``training``: whether LoRA trains this round

    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        p, rounds = cfg.peft, cfg.federation.rounds
        return [
            ("peft.probe_rounds", p.probe_rounds, p.probe_rounds >= 0,
             "use 0 (half of federation.rounds) or the number of head-only rounds"),
            ("peft.probe_rounds", p.probe_rounds, p.method == cls.name or p.probe_rounds == 0,
             f"probe_rounds is an option of peft.method = '{cls.name}'; leave it at 0 for other methods"),
            ("peft.probe_rounds", p.probe_rounds, p.method != cls.name or not rounds or p.probe_rounds < rounds,
             f"the head-only rounds must leave LoRA a round within federation.rounds ({rounds}); lower it, or use "
             "peft.method = 'probe' for a head alone"),
        ]

    def rules(self, cfg: RunConfig) -> list[Rule]:
        return Probe.rules(self, cfg)  # type: ignore[arg-type]  # the probe's rules hold as they are (the head)

    # ---- the phases ---------------------------------------------------------------------------------------------
    @property
    def probe_rounds(self) -> int:
        return self.peft.probe_rounds or self.rounds // 2

    def lora_trains(self, server_round: int) -> bool:
        return server_round > self.probe_rounds

    @contextmanager
    def training(self, model: Any, instructions: Mapping[str, Any]) -> Iterator[None]:
        """The round number decides the phase (and so what the site computes and uploads)."""
        if wire.SERVER_ROUND not in instructions:
            raise ModelError(f"peft.method = '{self.name}': the round's instructions carry no round number, which "
                             "decides whether LoRA trains")
        previous, self._lora_round = self._lora_round, self.lora_trains(as_int(instructions[wire.SERVER_ROUND]))
        try:
            yield
        finally:
            self._lora_round = previous

    def _lora_now(self) -> bool:
        if self._lora_round is None:
            raise ModelError(f"peft.method = '{self.name}' computes a round only inside method.training(model, "
                             "instructions): the round number decides whether LoRA trains")
        return self._lora_round

    # ---- the model ----------------------------------------------------------------------------------------------
    def wrap(self, model: Any, seed: int = 0) -> Any:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        classes = int(getattr(model.config, "num_labels", 0) or 0)
        if classes < 2:
            raise ModelError(f"peft.method = '{self.name}' needs a classification base with at least 2 labels, got "
                             f"{classes}")
        targets = self.targets(model)
        config = LoraConfig(r=self.peft.r, lora_alpha=self.peft.alpha,  # type: ignore[arg-type]  # scaling alpha / r
                            lora_dropout=0.0, target_modules=targets)
        with torch.random.fork_rng(devices=[]):  # the same seeded A at every party (FFA keeps it)
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_B" in name or ("lora_A" in name and self.peft.lora_mode != "ffa"))
        wrapped = LinearProbe(model, classes)
        setattr(wrapped, PARTIAL_ATTRIBUTE, ProbeLoraConfig(self.name, self.task, self.peft.r, self.peft.alpha,
                                                            self.peft.lora_mode, tuple(targets), seed))
        return wrapped

    def targets(self, model: Any) -> list[str]:
        """The LoRA method's target layers, inside the backbone's blocks only (a pooler or base head never reaches
        the pooled features: its LoRA would only add noise)."""
        names = lora_targets(model, self.peft)
        if not names:
            raise ModelError(f"peft.method = '{self.name}': no default LoRA targets for model type "
                             f"'{getattr(model.config, 'model_type', '?')}'; set peft.target_modules")
        encoder = probe.backbone(model)
        prefix = f"{model.base_model_prefix}." if encoder is not model else ""
        found = [prefix + name for name, module in encoder.named_modules()
                 if isinstance(module, nn.Linear) and "pooler" not in name
                 and any(f".{prefix}{name}".endswith(f".{target}") for target in names)]  # peft's suffix match
        if not found:
            raise ModelError(f"peft.method = '{self.name}': no linear layer of the backbone is named one of {names}; "
                             "set peft.target_modules")
        return found

    def load_saved(self, base: Any, adapter_dir: str) -> Any:
        import torch
        from safetensors.torch import load_file

        saved_config = json.loads((Path(adapter_dir) / METHOD_FILE).read_text(encoding="utf-8"))
        peft = PeftConfig(method=self.name, r=saved_config["r"], alpha=saved_config["alpha"],
                          lora_mode=saved_config["lora_mode"], target_modules=tuple(saved_config["target_modules"]))
        wrapped = ProbeLora(peft, task=saved_config["task"]).wrap(base, saved_config["seed"])
        parameters = dict(wrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
                parameters[name].copy_(tensor)
        return wrapped

    # ---- a site -------------------------------------------------------------------------------------------------
    def site_data(self, model: Any, data: EncodedData, *, cache_dir: Path, settings: dict[str, Any]) -> Any:
        fingerprint = getattr(model, "base_fingerprint", None)
        if fingerprint is None:  # once per process: hashing the base's weights is not free
            fingerprint = model.base_fingerprint = model_fingerprint(_BaseOnly(model.base))
        with adapters_off(model):  # the cache holds the frozen base's features, whatever LoRA holds now
            features = probe.cached_features(model.base, data, cache_dir=cache_dir, base_fingerprint=fingerprint,
                                             settings=settings)
        return ProbeLoraData(features, data)

    def local_train(self, model: Any, data: Any, cfg: TrainConfig, *, seed: int, proximal_mu: float) -> TrainResult:
        import torch

        if self._lora_now():
            return train_through_adapters(model, data.encoded, cfg, seed=seed)
        weight, result = probe.train(model.probe.weight.detach(), data.features, learning_rate=cfg.learning_rate,
                                     epochs=cfg.local_epochs, batch_size=cfg.batch_size, seed=seed)
        with torch.no_grad():
            model.probe.weight.copy_(weight)
        return result

    def local_evaluate(self, model: Any, data: Any, cfg: TrainConfig) -> EvalResult:
        features = data.features if adapters_are_zero(model) else probe.compute_features(model.base, data.encoded)
        return probe.evaluate(model.probe.weight.detach(), features)

    def clipped_gradient_sum(self, model: Any, data: Any, rows: Any, clip: float) -> Any:
        import torch

        index = torch.as_tensor(rows, dtype=torch.long)
        if not self._lora_now():  # the probe's closed form on the cached (exact) features
            weight = model.probe.weight.detach()
            return probe.clipped_gradient_sum(weight, data.features.x[index], data.features.labels[index],
                                              clip).flatten().numpy()
        model.eval()
        return per_example.clipped_rows_sum(trainable_linears(model), data.encoded, rows,
                                            lambda batch: row_losses(model, batch), clip=clip)

    # ---- the server ---------------------------------------------------------------------------------------------
    def gradient_template(self, global_state: Mapping[str, Any], server_round: int) -> AdapterState:
        if self.lora_trains(server_round):
            return dict(global_state)
        return {WEIGHT: global_state[WEIGHT]}


def trainable_linears(model: Any) -> dict[str, Any]:
    """Parameter name -> the linear module whose weight it is, for every trainable tensor (the wire names)."""
    modules = {f"{name}.weight": module for name, module in model.named_modules() if hasattr(module, "weight")}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in trainable if name not in modules]
    if missing:
        raise ModelError(f"peft.method = '{NAME}': trainable tensors {missing[:2]} are not linear weights")
    return {name: modules[name] for name in trainable}


def row_losses(model: Any, batch: Mapping[str, Any]) -> Any:
    """Each row's cross-entropy through the adapted base and the head."""
    import torch

    features = probe.pooled_features(probe.backbone(model.base), batch["input_ids"], batch["attention_mask"])
    logits = model.probe(features)
    return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none")


def train_through_adapters(model: Any, data: EncodedData, cfg: TrainConfig, *, seed: int) -> TrainResult:
    """Non-private local training of head and LoRA: SGD with momentum on the mean loss, as the probe trains."""
    import torch

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=cfg.learning_rate, momentum=0.9)
    generator, losses = torch.Generator().manual_seed(seed), []
    model.eval()  # no dropout: the features the head is evaluated on
    for _ in range(cfg.local_epochs):
        for batch in iterate_batches(data, cfg.batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = row_losses(model, batch).mean()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    mean = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean, len(losses), len(data))


def lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def adapters_are_zero(model: Any) -> bool:
    """Every LoRA B is zero: the adapted base computes exactly the frozen base's features."""
    return all(not bool(b.weight.any()) for layer in lora_layers(model) for b in layer.lora_B.values())


@contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The frozen base's forward pass. peft's ``enable_adapters`` would also reset which LoRA tensors train (FFA's
    A would), so only the switch its forward pass reads is flipped."""
    layers = [layer for layer in lora_layers(model) if not layer.disable_adapters]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False
