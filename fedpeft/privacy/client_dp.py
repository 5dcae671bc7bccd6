"""Client-level (user-level) DP for the federation: each site's whole update is clipped to norm S, and Gaussian
noise N(0, (zS)^2) lands on the sum -- added by the server ("central"), or in shares by the sites
("distributed": each adds N(0, (zS)^2 / m)), so that under secure aggregation no party holds a noiseless sum.

m is ``federation.min_sites``, the fewest surviving sites a round accepts: if more survive, the sum carries more
noise than promised, never less.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from fedpeft.privacy.accounting import Release, epsilon


def update_norm(update: Mapping[str, Any]) -> float:
    return float(sum(float(t.double().pow(2).sum()) for t in update.values()) ** 0.5)


def clip_update(update: Mapping[str, Any], clip: float) -> tuple[dict[str, Any], float]:
    """Scale the whole update (all tensors together) to L2 norm <= clip; returns (clipped, norm before)."""
    norm = update_norm(update)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {name: tensor * scale for name, tensor in update.items()}, norm


def _fresh_generator() -> Any:
    import torch

    # DP noise must be unpredictable to whoever sees the result: seed from the OS's CSPRNG, never from run seeds.
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_gaussian(values: Mapping[str, Any], std: float) -> dict[str, Any]:
    import torch

    if std == 0:
        return dict(values)
    generator = _fresh_generator()
    return {name: t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * std for name, t in values.items()}


def noise_share_std(noise_multiplier: float, clip: float, min_survivors: int) -> float:
    """Per-site std such that >= ``min_survivors`` shares sum to at least N(0, (zS)^2)."""
    return noise_multiplier * clip / max(min_survivors, 1) ** 0.5


def central_noise_std(noise_multiplier: float, clip: float) -> float:
    return noise_multiplier * clip


def client_level_epsilon(rounds: list[Release], delta: float, accountant: str) -> float:
    """User-level epsilon: one Gaussian release per round, subsampled by the fraction of sites sampled."""
    return epsilon(rounds, delta, accountant)
