"""Test-wide settings: never touch a model hub; keep tokenizers single-threaded in forked workers; one Ray cluster
for the session's federations."""

from __future__ import annotations

import os

import pytest

from tests import ray_cluster

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_cluster(request, tmp_path_factory):
    """One Ray cluster for the session's federations (tests/ray_cluster.py), when it runs any (a `slow` test) and
    neither the caller's ``RAY_ADDRESS`` nor ``FEDPEFT_TESTS_RAY=fresh`` says otherwise."""
    wanted = any(item.get_closest_marker("slow") for item in request.session.items)
    if not wanted or os.environ.get("RAY_ADDRESS") or os.environ.get("FEDPEFT_TESTS_RAY") == "fresh":
        yield
        return
    process = ray_cluster.start(tmp_path_factory.mktemp("ray"))
    try:
        yield
    finally:
        if process is not None:
            ray_cluster.stop(process)
