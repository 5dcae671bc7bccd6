"""A real deployment on 127.0.0.1 for tests: PKI by fedpeft's own code, a coordinator and site agents as processes.

Keys are born at the site, as in a real federation: each site's key pairs are made by `fedpeft client keygen`'s code
in a directory of the site's own, and the coordinator registers only the public keys."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.data.synthetic import SUPPORT_LABELS, make_support_tickets
from fedpeft.deploy.pki import add_site, init_pki, site_keygen
from fedpeft.deploy.site_keys import AUDIT_KEY, AUDIT_PUB, NODE_KEY, NODE_PUB, SitePublicKeys

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
rounds = {rounds}
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


def site_keys(directory: Path) -> SitePublicKeys:
    """A site's own key pairs, made at the site (`fedpeft client keygen --out DIRECTORY`); the public keys it sends."""
    made = site_keygen(directory)
    return SitePublicKeys(made.directory / NODE_PUB, made.directory / AUDIT_PUB)


def _point_at_keys(site_toml: Path, key_dir: Path) -> None:
    """site.toml names the site's private keys where the site keeps them (outside the coordinator's PKI folder)."""
    text = site_toml.read_text()
    for option, file in (("node_key", NODE_KEY), ("audit_key", AUDIT_KEY)):
        text = text.replace(f'{option} = "{file}"', f"{option} = {json.dumps(str(key_dir.resolve() / file))}")
    site_toml.write_text(text)


def build(root: Path, sites: tuple[str, ...] = ("a", "b", "c"), examples_per_site: int = 96,
          rounds: int = 2) -> Deployment:
    """PKI, one data file per site (its own file, in its bundle) and the run config.

    One machine plays every part: each site runs from the coordinator's copy of its bundle (<pki>/sites/<name>, where
    the tests read its ledger and logs), while its private keys stay in <root>/site-keys/<name>, named by absolute
    path in its site.toml, so the PKI folder holds no site private key and `fedpeft server` starts."""
    port = free_port()
    init_pki(root / "pki", ["127.0.0.1", "localhost"])
    data = make_support_tickets(examples_per_site * len(sites), seed=3)
    for number, name in enumerate(sites):
        key_dir = root / "site-keys" / name
        bundle = add_site(root / "pki", name, f"127.0.0.1:{port}", site_keys(key_dir)).directory
        _point_at_keys(bundle / "site.toml", key_dir)
        rows = range(number, len(data.texts), len(sites))
        with (bundle / "data.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows((data.texts[i], SUPPORT_LABELS[data.labels[i]]) for i in rows)
        text = (bundle / "site.toml").read_text()
        text = text.replace('data_path = "/path/to/local/data.csv"', 'data_path = "data.csv"')
        text = text.replace("# local_port = 9094", f"local_port = {free_port()}")
        (bundle / "site.toml").write_text(text)
    labels = json.dumps(list(SUPPORT_LABELS))
    (root / "run.toml").write_text(RUN_TOML.format(labels=labels, name=RUN_NAME, out=root / "runs", rounds=rounds))
    return Deployment(root, port, list(sites))


def site_bundle(tmp_path: Path, coordinator: str) -> Path:
    """A PKI with one site, ``hospital-a``, and that site's own directory as its IT team sets it up: its keys made
    there by keygen, the bundle's ca.pem, site.toml and policy.toml copied in, and a two-row data file site.toml
    points at. Returns the site's directory (not the coordinator's copy of the bundle)."""
    pki = init_pki(tmp_path / "pki", ["127.0.0.1"])
    site = tmp_path / "hospital-a"
    bundle = add_site(pki, "hospital-a", coordinator, site_keys(site)).directory
    for file in ("ca.pem", "site.toml", "policy.toml"):  # what the coordinator's operators send back
        shutil.copy(bundle / file, site / file)
    (site / "data.csv").write_text("text,label\nchest pain,urgent\nrepeat prescription,routine\n")
    config = site / "site.toml"
    config.write_text(config.read_text().replace('"/path/to/local/data.csv"', '"data.csv"'))
    return site
