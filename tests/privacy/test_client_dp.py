from __future__ import annotations

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.errors import ConfigError
from fedpeft.privacy.client_dp import add_gaussian, clip_update, noise_share_std, update_norm
from fedpeft.server.client_dp import ServerClientDp


def test_clip_update_bounds_the_whole_update_norm_and_keeps_small_updates():
    update = {"a": torch.full((10,), 3.0), "b": torch.full((2, 2), 4.0)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(update_norm(update))
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["a"].norm(), update["a"] / update["a"].norm())
    small, _ = clip_update({"a": torch.full((4,), 0.1)}, 1.0)
    assert torch.equal(small["a"], torch.full((4,), 0.1))


def test_distributed_shares_sum_to_at_least_the_central_noise():
    z, clip, m = 1.2, 0.5, 4
    shares = [add_gaussian({"x": torch.zeros(200_000)}, noise_share_std(z, clip, m))["x"] for _ in range(m)]
    assert float(sum(shares).std()) == pytest.approx(z * clip, rel=0.02)
    assert not torch.equal(shares[0], shares[1]), "every share draws fresh noise"


def test_central_mode_adds_noise_of_std_z_s_and_accounts_each_round():
    cfg = from_mapping({"privacy": {"client_dp": "central", "client_clip": 0.5, "client_noise_multiplier": 2.0},
                        "federation": {"weighting": "uniform"}})
    server = ServerClientDp(cfg)
    noisy, eps1 = server.apply({"x": torch.zeros(200_000)}, 0.5)
    assert float(noisy["x"].std()) == pytest.approx(1.0, rel=0.02)
    _, eps2 = server.apply({"x": torch.zeros(3)}, 0.5)
    assert 0 < eps1 < eps2


def test_distributed_mode_adds_nothing_at_the_server_but_still_accounts():
    cfg = from_mapping({"privacy": {"client_dp": "distributed"},
                        "federation": {"weighting": "uniform", "secure_aggregation": True}})
    total, eps = ServerClientDp(cfg).apply({"x": torch.ones(5)}, 1.0)
    assert torch.equal(total["x"], torch.ones(5)) and eps > 0
    assert ServerClientDp(from_mapping({})).apply({"x": torch.ones(2)}, 1.0)[1] is None


def test_client_dp_needs_public_equal_weights():
    with pytest.raises(ConfigError, match="federation.weighting.*uniform"):
        from_mapping({"privacy": {"client_dp": "central"}})
