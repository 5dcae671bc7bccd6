"""A run continues from its last completed round's checkpoint: nothing is run or logged twice."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.composition import from_mapping
from fedpeft.io.lock import held_here
from fedpeft.runs.checkpoint import ADAPTER_WEIGHTS, round_dir
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.runs.state import load_server_state
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow


def test_a_resumed_run_continues_after_its_last_round(tmp_path):
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "federation": {"rounds": 1, "num_sites": 2, "aggregation": "fedadam"},
        "data": {"synthetic_examples": 80},
        "run": {"name": "resumed", "out_dir": str(tmp_path)},
    })
    first = simulate(cfg)
    after_one = load_server_state(first.run_dir)
    assert after_one.completed_round == 1 and after_one.rule_state, "fedadam's moments are part of the state"

    with open(first.run_dir / METRICS_FILE, "ab") as metrics:  # a crash mid-write left a partial line
        metrics.write(b'{"round": 2, "seco')
    longer = replace(cfg, federation=replace(cfg.federation, rounds=2))
    second = simulate(longer, resume=True)
    assert second.run_dir == first.run_dir
    rounds = [json.loads(line)["round"] for line in (second.run_dir / METRICS_FILE).read_text().splitlines()]
    assert rounds == [0, 1, 2], "round 0 and 1 are not run again"
    assert (second.run_dir / f"{METRICS_FILE}.torn").read_bytes() == b'{"round": 2, "seco\n'
    assert not held_here(second.run_dir / "run.lock"), "the run directory is free again once the run ended"
    assert second.summary["accuracy_by_round"][:2] == first.summary["accuracy_by_round"]
    saved = load_file(str(round_dir(second.run_dir, 2) / ADAPTER_WEIGHTS))
    state = load_server_state(second.run_dir)
    assert state.completed_round == 2
    assert state.global_state, "the global adapter is in the state"
    for name, tensor in state.global_state.items():  # the state's global adapter is the round-2 checkpoint
        assert torch.equal(saved[name], tensor), name


def test_a_new_run_continues_from_an_earlier_runs_adapter(tmp_path):
    """Continual federated fine-tuning: run 2's round 0 evaluates run 1's final adapter."""
    import pytest as _pytest

    from fedpeft.errors import AdapterMismatchError, ConfigError

    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "peft": {"lora_mode": "ffa"},
        "federation": {"rounds": 1, "num_sites": 2},
        "data": {"synthetic_examples": 80},
        "run": {"name": "first", "out_dir": str(tmp_path)},
    })
    first = simulate(cfg)
    adapter = first.run_dir / "adapters" / "round-0001"
    second = simulate(replace(cfg, run=replace(cfg.run, name="second", init_from=str(adapter))))
    first_rounds = [json.loads(line) for line in (first.run_dir / METRICS_FILE).read_text().splitlines()]
    second_rounds = [json.loads(line) for line in (second.run_dir / METRICS_FILE).read_text().splitlines()]
    assert second_rounds[0]["global_eval_loss"] == _pytest.approx(first_rounds[1]["global_eval_loss"], rel=1e-5)

    from fedpeft.server.initial import initial_adapter

    with _pytest.raises(ConfigError, match="frozen tensor"):  # FFA's A comes from run.seed: it must not change
        initial_adapter(replace(cfg, run=replace(cfg.run, seed=1, init_from=str(adapter))))
    with _pytest.raises(AdapterMismatchError):
        initial_adapter(replace(cfg, peft=replace(cfg.peft, r=4), run=replace(cfg.run, init_from=str(adapter))))
    with _pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        initial_adapter(replace(cfg, run=replace(cfg.run, init_from=str(tmp_path))))
