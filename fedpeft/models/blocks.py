"""Which transformer block a parameter belongs to, from its name (layered learning rates, layer freezing)."""

from __future__ import annotations

import re

_BLOCK = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (Llama ``layers.N``, BERT ``layer.N``, GPT-2 ``h.N``)."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None
