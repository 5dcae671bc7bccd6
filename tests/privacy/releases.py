"""Privacy parameters shared by the accounting and planning tests."""

from __future__ import annotations

from fedpeft.privacy.accounting import SkellamRelease

DELTA = 1e-5
Q = 16 / 1000  # 1000 examples per site, batch 16

SK_Q, SK_L2 = 0.02, 120.0
SK_L1 = SK_L2 * 10.0
SK_MU = (1.1 * SK_L2) ** 2  # Gaussian-equivalent noise multiplier 1.1


def skellam_release(steps: int = 40, mu: float = SK_MU) -> SkellamRelease:
    return SkellamRelease(sample_rate=SK_Q, mu=mu, l1=SK_L1, l2=SK_L2, steps=steps)
