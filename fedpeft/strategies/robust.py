"""Byzantine-robust rules over the individual client updates (Yin et al., "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018): the coordinate-wise median and the coordinate-wise trimmed mean.

A mean moves arbitrarily far with a single bad client; these statistics stay within the range of the honest
clients' values as long as fewer than half (median) or fewer than ``k`` per side (trimmed mean) are bad.  Both are
order statistics of each coordinate over the clients, so they need the individual updates and cannot run on a
secure sum.

Both are deliberately unweighted: a client's weight is its self-reported example count, so weighting would let one
client buy any influence it likes by claiming many examples -- exactly what a robust rule must not allow.  Neither
keeps state between rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.errors import ConfigError, FederationError
from fedpeft.strategies.base import IndividualUpdatesRule, State, register_rule


def stacked_updates(global_state: Mapping[str, Any], updates: Sequence[tuple[Mapping[str, Any], float]],
                    rule: str) -> dict[str, Any]:
    """Per global tensor, the clients' deltas stacked along a new leading client dimension.

    Checks what a sum would have caught implicitly: every client sent the same tensor names and shapes, and they
    cover the global state (extra names, like the heterogeneous-rank weight vector, are not part of the state).
    """
    import torch

    if not updates:
        raise FederationError(f"aggregation rule '{rule}' got no client updates (no client returned)")
    names = set(updates[0][0])
    for update, weight in updates:
        if not weight > 0:
            raise FederationError(f"client weight must be positive, got {weight!r}")
        if set(update) != names:
            raise FederationError("client updates disagree on their tensor names; every client must train the "
                                  "same adapter")
    missing = set(global_state) - names
    if missing:
        raise FederationError(f"client updates lack {len(missing)} global tensors, e.g. {sorted(missing)[:3]}")
    out = {}
    for key in global_state:
        try:
            out[key] = torch.stack([update[key] for update, _ in updates])
        except RuntimeError as err:
            shapes = sorted({tuple(update[key].shape) for update, _ in updates})
            raise FederationError(f"client updates of tensor '{key}' differ in shape ({shapes}); every client must "
                                  "train the same adapter") from err
    return out


@register_rule
class CoordinateMedian(IndividualUpdatesRule):
    """global + the coordinate-wise median of the client deltas (the mean of the two middle values for even n)."""

    name = "median"

    def aggregate_updates(self, global_state: Mapping[str, Any],
                          updates: Sequence[tuple[Mapping[str, Any], float]]) -> State:
        n = len(updates)
        out = {}
        for key, stacked in stacked_updates(global_state, updates, self.name).items():
            # torch.median returns the lower middle value for even n; the textbook median averages the two
            ordered = stacked.sort(dim=0).values
            middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
            out[key] = global_state[key] + middle
        return out


@register_rule
class TrimmedMean(IndividualUpdatesRule):
    """global + the coordinate-wise trimmed mean of the client deltas.

    Per coordinate, the k = floor(trim_fraction * n) largest and k smallest client values are dropped and the rest
    averaged.  The floor means small rounds trim nothing (with trim_fraction 0.2, fewer than 5 clients give k = 0,
    i.e. the plain unweighted mean) rather than failing the round: the rule never claims robustness it cannot give
    for that n, and trim_fraction < 0.5 guarantees at least one value is left.
    """

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = 0.2, **_: Any) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ConfigError(f"strategy.trim_fraction = {trim_fraction!r} is out of range; use a fraction in "
                              "[0, 0.5) of the clients to drop on each side")
        self.trim_fraction = trim_fraction

    def trimmed_per_side(self, n: int) -> int:
        return math.floor(self.trim_fraction * n + 1e-9)  # 0.29 * 100 is 28.999...; it means 29

    def aggregate_updates(self, global_state: Mapping[str, Any],
                          updates: Sequence[tuple[Mapping[str, Any], float]]) -> State:
        n = len(updates)
        k = self.trimmed_per_side(n)
        out = {}
        for key, stacked in stacked_updates(global_state, updates, self.name).items():
            kept = stacked.sort(dim=0).values[k:n - k] if k else stacked
            out[key] = global_state[key] + kept.mean(dim=0)
        return out
