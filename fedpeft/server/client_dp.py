"""The server's side of client-level DP: central noise on the decoded sum, and user-level accounting."""

from __future__ import annotations

from typing import Any

from fedpeft.config import RunConfig
from fedpeft.privacy.accounting import Release
from fedpeft.privacy.client_dp import add_gaussian, central_noise_std, client_level_epsilon


class ServerClientDp:
    """Adds N(0, (zS)^2) to the sum in ``central`` mode; accounts one release per aggregated round in both modes."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg.privacy
        self.releases: list[Release] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.client_dp != "off"

    def apply(self, update_sum: dict[str, Any], sampled_fraction: float) -> tuple[dict[str, Any], float | None]:
        """Return (the sum to aggregate, the user-level epsilon after this round, or None without client DP)."""
        if not self.enabled:
            return update_sum, None
        if self.cfg.client_dp == "central":
            update_sum = add_gaussian(update_sum, central_noise_std(self.cfg.client_noise_multiplier,
                                                                    self.cfg.client_clip))
        self.releases.append((self.cfg.client_noise_multiplier, min(sampled_fraction, 1.0), 1))
        return update_sum, self.epsilon()

    def epsilon(self) -> float | None:
        if not self.enabled:
            return None
        return client_level_epsilon(self.releases, self.cfg.delta, self.cfg.accountant)
