"""A site's agent with its warm worker: the worker is started before the SuperNode, restarted when it dies and
named in the node config; a taken local port is explained before Flower's SuperNode would fail on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from flwr.common.config import parse_config_args

from fedpeft import wire
from fedpeft.client.proxy import WorkerUnavailable, ping
from fedpeft.deploy.agent import (
    DEFAULT_LOCAL_PORT,
    check_site,
    load_site_settings,
    node_config,
    start_worker,
    worker_socket,
)
from tests.deploy.federation import site_bundle


@pytest.fixture
def bundle(tmp_path):
    return site_bundle(tmp_path, "127.0.0.1:9092")


def test_the_node_config_names_the_workers_socket_in_the_state_dir(bundle):
    site = load_site_settings(bundle / "site.toml")
    parsed = parse_config_args([node_config(site)])
    assert parsed[wire.NODE_WORKER_SOCKET] == str(site.state_dir / "worker" / "worker.sock")


def test_without_local_port_each_site_gets_its_own(bundle):
    config = bundle / "site.toml"
    text = "\n".join(line for line in config.read_text().splitlines() if not line.startswith("local_port"))
    config.write_text(text.replace("index = 0", "index = 3"))
    assert load_site_settings(config).local_port == DEFAULT_LOCAL_PORT + 3


def test_a_state_dir_too_deep_for_a_socket_gets_its_own_socket_in_a_private_runtime_dir(bundle, tmp_path):
    """Unix socket paths hold 108 bytes; a deep state_dir (pytest's, a site's /srv/...) must not stop the agent."""
    import os
    import stat

    config = bundle / "site.toml"
    config.write_text(config.read_text().replace('state_dir = "agent-state"', f'state_dir = "{"s" * 120}"'))
    site = load_site_settings(config)
    check_site(site, reach_coordinator=False)
    path = worker_socket(site)
    assert len(os.fsencode(str(path))) <= 107 and path.name.startswith("worker-")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.stat().st_uid == os.getuid()
    other = site.__class__(**{**site.__dict__, "state_dir": tmp_path / ("t" * 120)})
    assert worker_socket(other) != path, "two sites on one host never share a socket"


def test_a_taken_local_port_is_named_with_the_option_that_sets_it(bundle, tmp_path):
    """Two sites on one host with the same local_port: the second agent says which port and how to pick another,
    instead of Flower's bare 'exit code 1'."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = bundle / "site.toml"
        config.write_text(config.read_text().replace("# local_port = 9094", f"local_port = {port}"))
        agent = subprocess.run([sys.executable, "-m", "fedpeft.cli", "client", "--site-config", str(config),
                                "--attempts", "0"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    said = agent.stdout + agent.stderr
    assert agent.returncode == 2, said
    assert f"port {port} on 127.0.0.1 is in use" in said and "[site] local_port in site.toml" in said
    assert "free now" in said


def test_the_worker_is_restarted_when_it_dies_and_stopped_with_the_agent(bundle):
    site = load_site_settings(bundle / "site.toml")
    site.state_dir.mkdir(parents=True, exist_ok=True)
    said: list[str] = []
    worker = start_worker(site, said.append)
    try:
        path = str(worker_socket(site))
        first = ping(path)["pid"]
        os.kill(first, 9)
        deadline = time.monotonic() + 300
        while True:
            try:
                second = ping(path, wait=1.0)["pid"]
                if second != first:
                    break
            except WorkerUnavailable:  # still coming back
                pass
            assert time.monotonic() < deadline, f"no new worker; said: {said}"
            time.sleep(0.5)
    finally:
        worker.stop()
    assert any("ended (exit code -9); starting it again" in line for line in said), said
    assert not worker_socket(site).exists()
    assert "listening on" in (site.state_dir / "worker.log").read_text()
