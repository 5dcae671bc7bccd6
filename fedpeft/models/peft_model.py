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


def wrap_with_peft(model: Any, cfg: PeftConfig, task: str, seed: int = 0) -> Any:
    """Return the peft model; only the adapter (and, for classification, the head) is trainable.

    The adapter's initial values come from ``seed``, so every process that wraps the same base with the same seed
    holds the same initial adapter -- which FFA-LoRA relies on: its A matrices stay at that shared init.
    """
    import torch
    from peft import get_peft_model

    peft_config = build_peft_config(model, cfg, task)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise ModelError(f"peft could not wrap {type(model).__name__} with targets "
                         f"{peft_config.target_modules}: {err}. Set peft.target_modules to module names of this "
                         "model") from err
    train_heads_in_fp32(peft_model)
    if cfg.lora_mode == "ffa":
        freeze_lora_a(peft_model)
    return peft_model


def freeze_lora_a(peft_model: Any) -> None:
    """FFA-LoRA (Sun et al., 2024): A stays fixed, only B (and a head) train and travel; the aggregate of
    B_k A is then exactly the mean of the sites' B_k A, and half the adapter is out of DP noise's reach."""
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)


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
