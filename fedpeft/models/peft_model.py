"""Wrap a frozen base model with a peft method; the result's trainable state is exactly what travels."""

from __future__ import annotations

from typing import Any

from fedpeft.config import PeftConfig
from fedpeft.errors import ModelError
from fedpeft.models.adapter_state import untravelled_trainable

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
    from peft import IA3Config, LoraConfig, TaskType

    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    if cfg.method == "lora":
        return LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=lora_targets(model, cfg), use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)
    if cfg.method == "adalora":
        from peft import AdaLoraConfig

        # peft's step-based rank allocator is never called: fedpeft fixes the ranks per round on the server
        # (fedpeft/models/adalora.py); total_step only satisfies AdaLoraConfig's own check.
        return AdaLoraConfig(task_type=task_type, init_r=cfg.adalora_init_r, target_r=cfg.r, lora_alpha=cfg.alpha,
                             lora_dropout=cfg.dropout, target_modules=lora_targets(model, cfg), total_step=1,
                             orth_reg_weight=cfg.adalora_orth_reg)
    if cfg.method == "bottleneck":
        from fedpeft.models.bottleneck import bottleneck_targets, register

        targets = list(cfg.target_modules) or bottleneck_targets(getattr(model.config, "model_type", ""),
                                                                 cfg.adapter_placement)
        return register(LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                   target_modules=targets))
    if cfg.method == "ia3":
        targets, feedforward = ia3_targets(model, cfg)
        return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward)
    return prompt_learning_config(model, cfg, task_type)


def prompt_learning_config(model: Any, cfg: PeftConfig, task_type: Any) -> Any:
    """Prompt tuning (learned input embeddings), P-tuning (embeddings from a small MLP), prefix tuning (key/value
    prefixes on every layer from an MLP, Li & Liang) and P-tuning v2 (the same prefixes learned directly)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    width = cfg.encoder_hidden_size or int(getattr(model.config, "hidden_size", 0)) or None
    common = {"task_type": task_type, "num_virtual_tokens": cfg.virtual_tokens}
    if cfg.method == "prompt-tuning":
        return PromptTuningConfig(**common)
    if cfg.method == "p-tuning":
        return PromptEncoderConfig(**common, encoder_hidden_size=width)
    if cfg.method in ("prefix-tuning", "p-tuning-v2"):
        check_takes_prefixes(model, cfg.method)
    if cfg.method == "prefix-tuning":
        return PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=width)
    if cfg.method == "p-tuning-v2":
        return PrefixTuningConfig(**common, prefix_projection=False)
    raise ModelError(f"peft.method = {cfg.method!r} is not supported; use one of 'lora', 'ia3', 'prompt-tuning', "
                     "'p-tuning', 'prefix-tuning', 'p-tuning-v2', 'bottleneck'")


def check_takes_prefixes(model: Any, method: str) -> None:
    """peft's prefix methods hand their prefixes to the base as ``past_key_values``; a transformers release whose
    model (or backbone) no longer names that argument would fail at the first forward, or silently drop the
    prefixes into ``**kwargs`` (transformers 5.24 renamed it to ``cache`` for Llama; measured)."""
    import inspect

    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    for module in (model, backbone):
        if module is not None and "past_key_values" in inspect.signature(module.forward).parameters:
            return
    raise ModelError(f"peft.method = {method!r} passes its prefixes as past_key_values, which "
                     f"{type(model).__name__}.forward of this transformers release does not take; use "
                     "peft.method = 'lora' or 'prompt-tuning', or install the tested versions "
                     "(pip install -e . -c constraints.txt)")


def ia3_targets(model: Any, cfg: PeftConfig) -> tuple[list[str] | None, list[str] | None]:
    """IA3 scales keys, values and the feed-forward output; configured targets scale their outputs (none of them
    feed-forward), else peft's per-architecture defaults."""
    if cfg.target_modules:
        return list(cfg.target_modules), []
    return None, None


def wrap_with_peft(model: Any, cfg: PeftConfig, task: str, seed: int = 0) -> Any:
    """Return the peft model; only the adapter (and, for classification, the head) is trainable.

    The adapter's initial values come from ``seed``, so every process that wraps the same base with the same seed
    holds the same initial adapter -- which FFA-LoRA relies on: its A matrices stay at that shared init.
    """
    import torch
    from peft import get_peft_model

    from fedpeft.models.partial import PARTIAL_METHODS, PartialConfig, prepare_partial

    if cfg.method in PARTIAL_METHODS:  # the base's own tensors train: no peft wrapper
        return prepare_partial(model, PartialConfig(cfg.method, cfg.trainable_blocks, task))
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
    if cfg.method == "ia3":
        keep_ia3_outputs_in_compute_dtype(peft_model)
    missing = untravelled_trainable(peft_model)
    if missing:  # they would train at every site and never be aggregated
        raise ModelError(f"peft.method = {cfg.method!r}: {len(missing)} trainable tensors (e.g. {missing[:2]}) are "
                         "not in peft's adapter state, so they could not travel; this method cannot be federated "
                         "as configured")
    return peft_model


def freeze_lora_a(peft_model: Any) -> None:
    """FFA-LoRA (Sun et al., 2024): A stays fixed, only B (and a head) train and travel; the aggregate of
    B_k A is then exactly the mean of the sites' B_k A, and half the adapter is out of DP noise's reach."""
    for name, param in peft_model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(False)


def keep_ia3_outputs_in_compute_dtype(peft_model: Any) -> None:
    """IA3's fp32 scaling vectors would promote a bf16 base's keys and values to fp32 (attention then refuses mixed
    dtypes); the scaled output goes back to the dtype the layer received."""
    from peft.tuners.ia3.layer import IA3Layer

    for module in peft_model.modules():
        if isinstance(module, IA3Layer):
            module.register_forward_hook(_output_like_input)


def _output_like_input(module: Any, args: tuple[Any, ...], output: Any) -> Any:
    first = args[0] if args else None
    if hasattr(first, "dtype") and hasattr(output, "dtype") and output.dtype != first.dtype \
            and first.is_floating_point():
        return output.to(first.dtype)
    return output


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
    """The config that describes what trains: peft's, or fedpeft's for the partial methods (saved with checkpoints)."""
    from fedpeft.models.partial import is_partial

    return model.fedpeft_partial if is_partial(model) else model.peft_config["default"]
