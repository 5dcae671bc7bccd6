"""bf16 autocast for the adapter's forward passes, with fp32 master weights.

By default peft casts each LoRA layer's input to the adapter's fp32 dtype, so every adapted projection keeps an fp32
copy of its input for backward — about 3 GiB of a 1.26B model's 9 GiB training peak at 8 × 256 tokens (H100,
benchmarks/RESULTS.md). Under bf16 autocast with that cast switched off, the adapter's matmuls run in bf16 on the
activations the base already keeps; the optimizer still updates fp32 weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any


@contextmanager
def bf16_autocast(model: Any, enabled: bool) -> Iterator[Callable[[], Any]]:
    """For the duration, yields a factory of the context to run each forward pass (and loss) in.

    Backward runs outside that context, as torch recommends; peft's input casting stays off until the block ends.
    """
    if not enabled:
        yield nullcontext
        return
    import torch

    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    saved = [m.cast_input_dtype_enabled for m in layers]
    device = next(model.parameters()).device.type
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield lambda: torch.autocast(device, dtype=torch.bfloat16)
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.cast_input_dtype_enabled = value
