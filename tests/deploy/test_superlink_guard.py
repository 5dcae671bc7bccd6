"""The coordinator's SuperLink answers Control and Runtime API calls from its own machine only."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from fedpeft.deploy.superlink import restrict_to_loopback


def _app() -> FastAPI:
    app = FastAPI()
    for path in ("/v1/control/start-run", "/v1/runtime/pull-messages", "/v1/fleet/pull-messages", "/health"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["POST"])
    return restrict_to_loopback(app)


@pytest.mark.parametrize(("client", "path", "status"), [
    ("10.1.2.3", "/v1/control/start-run", 403),
    ("10.1.2.3", "/v1/runtime/pull-messages", 403),
    ("10.1.2.3", "/v1/fleet/pull-messages", 200),
    ("10.1.2.3", "/health", 200),
    ("127.0.0.1", "/v1/control/start-run", 200),
    ("::1", "/v1/runtime/pull-messages", 200),
])
def test_only_the_fleet_api_is_open_to_other_machines(client, path, status):
    with TestClient(_app(), client=(client, 40000)) as http:
        assert http.post(path).status_code == status


def test_flowers_children_find_this_interpreters_scripts_without_an_activated_venv(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from fedpeft.deploy.processes import runtime_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a systemd unit's PATH: the venv was never activated
    env = runtime_env(tmp_path / "flwr")
    first = env["PATH"].split(":")[0]
    assert first == str(Path(sys.executable).parent) and env["PATH"].endswith("/usr/bin:/bin")
