"""Wrap a frozen base model with a peft method; the result's trainable state is exactly what travels."""

from __future__ import annotations

from typing import Any

from fedpeft.config import PeftConfig
from fedpeft.errors import ModelError

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


def build_peft_config(model: Any, cfg: PeftConfig, task: str) -> Any:
    from peft import LoraConfig, TaskType

    if cfg.method != "lora":
        raise ModelError(f"peft.method = {cfg.method!r} is not supported yet; use 'lora'")
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    return LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=lora_targets(model, cfg))


def wrap_with_peft(model: Any, cfg: PeftConfig, task: str) -> Any:
    """Return the peft model; only the adapter (and, for classification, the head) is trainable."""
    from peft import get_peft_model

    peft_config = build_peft_config(model, cfg, task)
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise ModelError(f"peft could not wrap {type(model).__name__} with targets "
                         f"{peft_config.target_modules}: {err}. Set peft.target_modules to module names of this "
                         "model") from err
    return peft_model
