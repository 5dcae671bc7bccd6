"""Methods that train the base model's own tensors: BitFit, layer freezing, full fine-tuning.

peft has none of them, so they cross no peft boundary: the "adapter" is the set of base parameters that train, by
their own names. What travels is exactly those tensors; a checkpoint holds them (safetensors) plus ``fedpeft.json``
naming the method, and ``load_partial`` puts them back into a fresh copy of the base.

- ``bitfit``: every bias of the model plus the task head (Ben Zaken et al., 2022); refused for a base without biases.
- ``freeze``: the top ``peft.trainable_blocks`` transformer blocks and the task head; the rest stays frozen.
- ``full``: every parameter. Only sensible for small models: the whole model travels each round.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.config.checks import Rule
from fedpeft.errors import ModelError
from fedpeft.methods.base import DP_NONE, FederatedMethod, register_method
from fedpeft.models.adapter_state import PARTIAL_ATTRIBUTE
from fedpeft.models.blocks import block_index, is_head
from fedpeft.models.saved import METHOD_FILE


@dataclass(frozen=True)
class PartialConfig:
    """Stands where a peft config stands (checkpoints and the audit log read it)."""

    method: str
    trainable_blocks: int = 0
    task: str = "classification"

    def save_pretrained(self, directory: str) -> None:
        (Path(directory) / METHOD_FILE).write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Partial(FederatedMethod):
    """No peft wrapper: the base's own tensors unfreeze in place, and travel by their own names."""

    trains_base = True

    def wrap(self, model: Any, seed: int = 0) -> Any:
        return prepare_partial(model, PartialConfig(self.name, self.peft.trainable_blocks, self.task))

    def load_saved(self, base: Any, adapter_dir: str) -> Any:
        return load_partial(base, Path(adapter_dir))


@register_method
class BitFit(_Partial):
    name = "bitfit"
    summary = "every bias term of the base, plus the task head (Ben Zaken et al., 2022)"


@register_method
class Freeze(_Partial):
    name = "freeze"
    summary = "the top peft.trainable_blocks blocks and the task head; the rest stays frozen"

    @classmethod
    def option_rules(cls, cfg: RunConfig) -> list[Rule]:
        blocks = cfg.peft.trainable_blocks
        return [("peft.trainable_blocks", blocks, cfg.peft.method != cls.name or blocks >= 1,
                 "train at least the top block (e.g. 2)")]


@register_method
class Full(_Partial):
    name = "full"
    summary = "every parameter of the model (small bases only: the whole model travels)"
    # Opacus fails on full fine-tuning of BERT-family bases: position embeddings shared across the batch have no
    # per-example gradient (measured).
    dp_sgd = DP_NONE

    def dp_rules(self, cfg: RunConfig) -> list[Rule]:
        return [("privacy.dp", cfg.privacy.dp, not cfg.privacy.dp,
                 "DP-SGD (Opacus) fails on full fine-tuning of BERT-family bases (position embeddings shared across "
                 "the batch have no per-example gradient; measured); with privacy.dp use peft.method = 'freeze' or "
                 "'bitfit'")]


def prepare_partial(model: Any, config: PartialConfig) -> Any:
    """Unfreeze the method's tensors of the (frozen) base in place and mark the model with its config."""
    names = trainable_names(model, config)
    if not names:
        raise ModelError(f"peft.method = {config.method!r}: no tensor of {type(model).__name__} would train "
                         f"({_why_none(config)})")
    for name, param in model.named_parameters():
        if name in names and not param.is_floating_point():
            raise ModelError(f"peft.method = {config.method!r} trains '{name}', which is quantized; set "
                             "model.quantization = 'none'")
        param.requires_grad_(name in names)
    setattr(model, PARTIAL_ATTRIBUTE, config)
    return model


def trainable_names(model: Any, config: PartialConfig) -> set[str]:
    named = dict(model.named_parameters())
    head = {n for n in named if is_head(n)}
    if config.method == "full":
        return set(named)
    if config.method == "bitfit":
        biases = {n for n in named if n.endswith(".bias") and n not in head}
        return biases | head if biases else set()
    blocks = {n: block_index(n) for n in named}
    depth = max((i for i in blocks.values() if i is not None), default=-1) + 1
    top = {n for n, i in blocks.items() if i is not None and i >= depth - config.trainable_blocks}
    return top | head


def _why_none(config: PartialConfig) -> str:
    if config.method == "bitfit":
        return "the base has no bias terms (Llama-family models have none); use another method"
    return "set peft.trainable_blocks to at least 1"


def load_partial(base: Any, adapter_dir: Path) -> Any:
    """A fresh base with a saved partial checkpoint's tensors put back (strictly: every saved name must exist)."""
    from safetensors.torch import load_file

    config = PartialConfig(**json.loads((adapter_dir / METHOD_FILE).read_text(encoding="utf-8")))
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        saved = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise ModelError(f"{weights}: cannot read the saved tensors ({err}); the checkpoint is damaged or not "
                         "fedpeft's — load another round's adapter (runs/NAME/adapters/round-NNNN)") from err
    params = dict(base.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ModelError(f"{adapter_dir}: {len(unknown)} saved tensors are not in this base model (e.g. "
                         f"{unknown[:2]}); load it on the base the run used")
    import torch

    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))
    setattr(base, PARTIAL_ATTRIBUTE, config)
    return base
