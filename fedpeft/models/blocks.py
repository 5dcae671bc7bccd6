"""Where a parameter sits, from its name: its transformer block (layered learning rates, layer freezing) or the
task head (local heads, BitFit / layer freezing)."""

from __future__ import annotations

import re

HEADS = ("score", "classifier")  # sequence-classification heads of Llama-family and BERT-family models
_WRAPPERS = ("base_model", "model")  # peft's prefixes before the base model's own parameter path
_BLOCK = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (Llama ``layers.N``, BERT ``layer.N``, GPT-2 ``h.N``)."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def is_head(name: str) -> bool:
    """True for the task head's tensors, whether named by the base (``classifier.weight``) or by peft
    (``base_model.model.classifier.weight``, ``base_model.classifier.modules_to_save.default.weight``)."""
    parts = name.split(".")
    while parts and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return bool(parts) and parts[0] in HEADS
