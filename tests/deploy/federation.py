"""A real deployment on 127.0.0.1 for tests: PKI by fedpeft's own code, a coordinator and site agents as processes."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.data.synthetic import SUPPORT_LABELS, make_support_tickets
from fedpeft.deploy.pki import add_site, init_pki

RUN_NAME = "deployed"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fedpeft(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli", *args]


@dataclass
class Deployment:
    root: Path
    port: int
    sites: list[str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / RUN_NAME

    def site_config(self, name: str) -> Path:
        return self.pki / "sites" / name / "site.toml"

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.out").open("ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.processes[name] = subprocess.Popen(_fedpeft(*args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                cwd=self.root, start_new_session=True)
        return self.processes[name]

    def start_coordinator(self) -> subprocess.Popen:
        return self.start("coordinator", ["server", "--pki", str(self.pki), "--config", str(self.root / "run.toml"),
                                          "--state-dir", str(self.root / "coordinator"), "--host", "127.0.0.1",
                                          "--port", str(self.port)])

    def start_site(self, name: str) -> subprocess.Popen:
        return self.start(name, ["client", "--site-config", str(self.site_config(name))])

    def output(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name)

    def rounds_logged(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for(self, condition, timeout: float, what: str, coordinator_runs: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            ended = coordinator_runs and self.processes["coordinator"].poll() is not None
            if ended or time.monotonic() > deadline:
                raise AssertionError(f"{'the coordinator ended' if ended else 'timed out'} waiting for {what}; "
                                     "coordinator output:\n"
                                     f"{self.output('coordinator')[-3000:]}")
            time.sleep(0.5)


RUN_TOML = """
[model]
name = "tiny-llama"
task = "classification"
max_length = 32
[train]
batch_size = 16
learning_rate = 0.005
[federation]
rounds = 2
num_sites = 3
min_sites = 2
round_timeout = 120.0
secure_aggregation = true
weighting = "uniform"
[privacy]
dp = true
target_epsilon = 8.0
[data]
label_names = {labels}
[run]
name = "{name}"
out_dir = "{out}"
"""


def build(root: Path, sites: tuple[str, ...] = ("a", "b", "c"), examples_per_site: int = 96) -> Deployment:
    """PKI, one data file per site (its own file, in its bundle) and the run config."""
    port = free_port()
    init_pki(root / "pki", ["127.0.0.1", "localhost"])
    data = make_support_tickets(examples_per_site * len(sites), seed=3)
    for number, name in enumerate(sites):
        bundle = add_site(root / "pki", name, f"127.0.0.1:{port}").directory
        rows = range(number, len(data.texts), len(sites))
        with (bundle / "data.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((data.texts[i], SUPPORT_LABELS[data.labels[i]]) for i in rows)
        text = (bundle / "site.toml").read_text()
        text = text.replace('data_path = "/path/to/local/data.csv"', 'data_path = "data.csv"')
        text = text.replace("local_port = 9094", f"local_port = {free_port()}")
        (bundle / "site.toml").write_text(text)
    labels = json.dumps(list(SUPPORT_LABELS))
    (root / "run.toml").write_text(RUN_TOML.format(labels=labels, name=RUN_NAME, out=root / "runs"))
    return Deployment(root, port, list(sites))


def site_bundle(tmp_path: Path, coordinator: str) -> Path:
    """A PKI with one site, ``hospital-a``, whose bundle holds a two-row data file its site.toml points at."""
    pki = init_pki(tmp_path / "pki", ["127.0.0.1"])
    site = add_site(pki, "hospital-a", coordinator).directory
    (site / "data.csv").write_text("text,label\nchest pain,urgent\nrepeat prescription,routine\n")
    config = site / "site.toml"
    config.write_text(config.read_text().replace('"/path/to/local/data.csv"', '"data.csv"'))
    return site
