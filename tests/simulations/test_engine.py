"""What fedpeft asks of Flower's Ray backend: a fresh local Ray unless a cluster is named, and sane resources."""

from __future__ import annotations

import pytest

from fedpeft.errors import ConfigError
from fedpeft.simulations.engine import _backend_config


def test_a_fresh_local_ray_unless_a_cluster_is_named(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _backend_config(1.0, False)["init_args"]["address"] == "local"  # never a `ray start` leftover
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert _backend_config(1.0, False)["init_args"]["address"] == "10.0.0.5:6379"
    assert _backend_config(1.0, False, ray_address="auto")["init_args"]["address"] == "auto"
    # a fresh local Ray starts no dashboard (a web port nobody asked for); a cluster's own settings are its own
    assert _backend_config(1.0, False, ray_address="local")["init_args"]["include_dashboard"] is False
    assert "include_dashboard" not in _backend_config(1.0, False, ray_address="auto")["init_args"]


def test_site_resources_reach_the_actors_and_bad_ones_are_refused():
    config = _backend_config(2.0, False, gpus_per_site=0.25)
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    with pytest.raises(ConfigError, match="cpus_per_site = 0"):
        _backend_config(0, False)
