"""Load a frozen base model and its tokenizer for a task, from a built-in name or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.config import ModelConfig
from fedpeft.errors import ModelError
from fedpeft.models.builtin import BUILTIN_MODELS, build_tiny_llama, minilm_path
from fedpeft.models.quantization import compute_device, guard_cpu_4bit, load_kwargs, quantize_built_model
from fedpeft.models.smollm2 import smollm2_path

BASE_SEED = 1234  # fixed so that every process builds the identical random-init parts (tiny model, fresh heads)


def resolve_model_path(name: str) -> Path:
    if name == "minilm":
        return minilm_path()
    if name == "smollm2-135m":
        return smollm2_path()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(f"model.name = {name!r} is neither a built-in model {list(BUILTIN_MODELS)} nor an existing "
                         "local directory; set it to a directory holding config.json and the weights")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory '{path}' has no config.json; point model.name at a Hugging Face model "
                         "directory (as written by save_pretrained)")
    return path


def load_base_model(cfg: ModelConfig, num_labels: int) -> tuple[Any, Any]:
    """Return (model, tokenizer) with every base parameter frozen.

    With ``model.classifier = "label-words"`` the model is the causal LM wrapped as a classifier that scores each
    class's word on the LM head (``fedpeft.models.label_words``): no head is added.
    """
    if cfg.task == "classification" and num_labels < 2:
        raise ModelError(f"classification needs at least 2 labels, the data has {num_labels}")
    quantization = load_kwargs(cfg)
    kind = "causal-lm" if uses_lm_head(cfg) else cfg.task
    if cfg.name == "tiny-llama":
        model, tokenizer = build_tiny_llama(kind, num_labels, BASE_SEED)
        if quantization:
            model = quantize_built_model(model, quantization)
    else:
        model, tokenizer = _load_pretrained(resolve_model_path(cfg.name), kind, num_labels, quantization)
    if not quantization:
        model = model.to(compute_device())  # a quantized base is placed by its device_map already
    guard_cpu_4bit(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = cfg.truncation_side  # every encoder of texts cuts where the run says
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.classifier == "label-words":
        from fedpeft.models.label_words import wrap_label_words  # imports torch: only where it is used

        model = wrap_label_words(model, tokenizer, template=cfg.prompt_template, words=cfg.label_words,
                                 num_labels=num_labels)
    return model, tokenizer


def uses_lm_head(cfg: ModelConfig) -> bool:
    """The base is loaded as a causal LM: for causal-lm fine-tuning, or to classify through label words."""
    return cfg.task == "causal-lm" or cfg.classifier == "label-words"


def _load_pretrained(path: Path, task: str, num_labels: int, extra: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if task == "causal-lm" and config.model_type in ("bert", "roberta", "distilbert", "xlm-roberta"):
        raise ModelError(f"model '{path}' ({config.model_type}) is an encoder and has no LM head for causal-lm or "
                         "label words; use model.task = 'classification' with model.classifier = 'head', or a "
                         "decoder model such as 'tiny-llama' or 'smollm2-135m'")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected: the head trains
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BASE_SEED)
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(path), num_labels=num_labels, local_files_only=True, **extra)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model from '{path}': {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer
