"""The same app runs under Flower's own tooling: pyproject.toml declares it and `flwr run .` runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedpeft.config import FLOWER_ROUNDS_ALIAS, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_apps_and_every_config_key_with_its_default():
    from flwr.common.config import flatten_dict

    app = _pyproject()["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedpeft.server.app:app", "clientapp": "fedpeft.client.app:app"}
    declared = flatten_dict(app["config"])
    expected = RunConfig().to_flat()
    expected[FLOWER_ROUNDS_ALIAS] = expected.pop("federation.rounds")
    assert declared == expected


def _stop_superlinks_of(flwr_home: Path) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            proc.kill()


def _flwr_run(tmp_path: Path, overrides: str, supernodes: int) -> subprocess.CompletedProcess:
    flwr_home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1"}
    flwr = Path(sys.executable).with_name("flwr")
    flwr = flwr if flwr.is_file() else Path(shutil.which("flwr") or "flwr")
    try:
        return subprocess.run([str(flwr), "run", ".", "--stream", "--run-config", overrides,
                               "--federation-config", f"num-supernodes={supernodes}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        _stop_superlinks_of(flwr_home)


@pytest.mark.slow
def test_flwr_run_with_run_config_overrides(tmp_path):
    out_dir = tmp_path / "runs"
    overrides = (f"num-server-rounds=1 model.name='tiny-llama' federation.num_sites=2 "
                 f"data.synthetic_examples=80 run.name='flwr' run.out_dir='{out_dir}'")
    proc = _flwr_run(tmp_path, overrides, supernodes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out_dir / "flwr" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["config"]["model"]["name"] == "tiny-llama"
    assert (out_dir / "flwr" / "adapters" / "round-0001" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_flwr_run_with_fewer_supernodes_than_sites_fails_at_once_naming_both_numbers(tmp_path):
    """Flower's default federation has 2 SuperNodes; a run that wants 3 sites must not wait round_timeout."""
    overrides = (f"num-server-rounds=1 model.name='tiny-llama' federation.num_sites=3 federation.round_timeout=900.0 "
                 f"data.synthetic_examples=80 run.name='few' run.out_dir='{tmp_path / 'runs'}'")
    proc = _flwr_run(tmp_path, overrides, supernodes=2)  # within the 400 s limit: far less than the 900 s timeout
    output = proc.stdout + proc.stderr
    assert "has 2 SuperNodes but federation.num_sites = 3" in output, output[-3000:]
    assert "num-supernodes=3" in output and "federation.num_sites=2" in output
