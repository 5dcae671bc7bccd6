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


def upload_weight(num_examples: float, *, weighting: str, max_weight: float) -> float:
    """A site's weight as it travels inside its masked vector: normalised into [0, 1] by the run's public
    ``secagg.max_weight`` (the ring encodes values in a known range), 1 under uniform weighting."""
    return num_examples / max_weight if weighting == "num-examples" else 1.0


def weight_scale(*, weighting: str, max_weight: float) -> float:
    """What undoes ``upload_weight``'s normalisation on the decoded sums (a mean is unchanged by it)."""
    return max_weight if weighting == "num-examples" else 1.0
