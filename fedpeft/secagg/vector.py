"""Adapter state <-> one flat float vector, in a fixed (sorted-name) order both sides derive from the global state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def flatten(state: Mapping[str, Any]) -> np.ndarray:
    """Concatenate the tensors in sorted-name order as float64 (the order is the wire contract)."""
    return np.concatenate([state[name].detach().cpu().double().numpy().ravel() for name in sorted(state)]) \
        if state else np.zeros(0)


def unflatten(vector: np.ndarray, template: Mapping[str, Any]) -> dict[str, Any]:
    """Split a flat vector back into tensors shaped (and typed) like ``template``."""
    import torch

    out, offset = {}, 0
    for name in sorted(template):
        like = template[name]
        size = like.numel()
        out[name] = torch.from_numpy(np.ascontiguousarray(vector[offset: offset + size])).reshape(like.shape) \
            .to(like.dtype)
        offset += size
    if offset != len(vector):
        raise ValueError(f"vector has {len(vector)} values, the adapter has {offset}")
    return out
