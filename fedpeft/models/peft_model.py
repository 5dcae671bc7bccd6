"""Wrap a frozen base model with a peft method; the result's trainable state is exactly what travels."""

from __future__ import annotations

from typing import Any

from fedpeft.config import PeftConfig
from fedpeft.errors import ModelError
from fedpeft.models.adapter_state import PARTIAL_ATTRIBUTE, untravelled_trainable

# LoRA on every linear layer of the block by default (QLoRA's finding: attention-only targets lose quality).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


def lora_targets(model: Any, cfg: PeftConfig) -> list[str] | None:
    """Configured targets, else the architecture default, else None (peft's own per-architecture default)."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    targets = DEFAULT_LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    return list(targets) if targets else None


def wrap_peft(model: Any, peft_config: Any, *, seed: int) -> Any:
    """The one crossing into peft: wrap the frozen base; only the adapter (and a task head) trains.

    The adapter's initial values come from ``seed``, so every process that wraps the same base with the same seed
    holds the same initial adapter -- which FFA-LoRA relies on: its A matrices stay at that shared init.
    """
    import torch
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise ModelError(f"peft could not wrap {type(model).__name__} with targets "
                         f"{peft_config.target_modules}: {err}. Set peft.target_modules to module names of this "
                         "model") from err
    train_heads_in_fp32(peft_model)
    return peft_model


def check_travels(peft_model: Any, method: str) -> None:
    """Every trainable tensor must be in peft's adapter state, else it would train at every site and never be
    aggregated."""
    missing = untravelled_trainable(peft_model)
    if missing:
        raise ModelError(f"peft.method = {method!r}: {len(missing)} trainable tensors (e.g. {missing[:2]}) are "
                         "not in peft's adapter state, so they could not travel; this method cannot be federated "
                         "as configured")


def train_heads_in_fp32(peft_model: Any) -> None:
    """A trained head (``modules_to_save``) on a bf16 base gets fp32 master weights and fp32 inputs."""
    import torch
    from peft.utils import ModulesToSaveWrapper

    for wrapper in peft_model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for head in wrapper.modules_to_save.values():
            if all(p.dtype == torch.float32 for p in head.parameters()):
                continue
            head.float()
            head.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if hasattr(a, "is_floating_point") and a.is_floating_point() else a for a in args)


def method_config(model: Any) -> Any:
    """The config that describes what trains, saved with checkpoints: peft's, or the one a partial method marked
    the model with (it has no peft wrapper)."""
    return getattr(model, PARTIAL_ATTRIBUTE, None) or model.peft_config["default"]
