"""The coordinator's resumable state: what is saved comes back, and a different run config is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedpeft.config import FederationConfig, RunConfig
from fedpeft.errors import ConfigError, FederationError
from fedpeft.runs.run_dir import last_logged_round
from fedpeft.runs.state import (
    SCHEMA_VERSION,
    STATE_FILE,
    ServerState,
    check_resumable,
    load_server_state,
    save_server_state,
)
from fedpeft.strategies import build_rule


def _state(cfg: RunConfig) -> ServerState:
    return ServerState(completed_round=3, global_state={"a.lora_B": torch.arange(6.0).reshape(2, 3)},
                       rule_state={"m/a.lora_B": torch.ones(2, 3)}, client_dp_releases=[(1.0, 0.5, 1)],
                       site_epsilon={"0": 1.5}, accuracy_by_round=[0.1, 0.5, 0.6, 0.7],
                       last_site_accuracy={"0": 0.7}, last_record={"round": 3, "global_accuracy": 0.7},
                       config=cfg.to_flat())


def test_saved_state_loads_back_identically(tmp_path):
    cfg = RunConfig()
    save_server_state(tmp_path, _state(cfg))
    loaded = load_server_state(tmp_path)
    assert loaded.completed_round == 3
    assert torch.equal(loaded.global_state["a.lora_B"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded.rule_state["m/a.lora_B"], torch.ones(2, 3))
    assert loaded.client_dp_releases == [(1.0, 0.5, 1)]
    assert loaded.site_epsilon == {"0": 1.5} and loaded.accuracy_by_round == [0.1, 0.5, 0.6, 0.7]
    assert loaded.last_record["global_accuracy"] == 0.7
    check_resumable(loaded, cfg, tmp_path)


def test_fresh_run_dir_has_no_state_and_damage_is_an_error(tmp_path):
    assert load_server_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(FederationError, match="cannot be read"):
        load_server_state(tmp_path)


def _rewrite_header(path, change) -> None:
    """Rewrite the state file with its safetensors metadata passed through ``change`` (tensors unchanged)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    path.write_bytes(save(tensors, metadata=change(header)))


def test_state_records_its_schema_version(tmp_path):
    from safetensors import safe_open

    path = save_server_state(tmp_path, _state(RunConfig()))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["schema_version"] == str(SCHEMA_VERSION) == "1"
    assert "schema_version" not in json.loads(header["fedpeft"])  # beside the JSON, readable without parsing it


def test_state_written_before_schema_versions_still_loads(tmp_path):
    path = save_server_state(tmp_path, _state(RunConfig()))
    _rewrite_header(path, lambda header: {k: v for k, v in header.items() if k != "schema_version"})
    loaded = load_server_state(tmp_path)
    assert loaded.completed_round == 3 and loaded.site_epsilon == {"0": 1.5}
    assert torch.equal(loaded.rule_state["m/a.lora_B"], torch.ones(2, 3))


def test_state_from_a_newer_fedpeft_is_refused_with_the_fix(tmp_path):
    path = save_server_state(tmp_path, _state(RunConfig()))
    # A newer writer may change the JSON too: the version is checked before anything else is read.
    _rewrite_header(path, lambda header: {"schema_version": str(SCHEMA_VERSION + 1), "fedpeft": "{new layout"})
    before = path.read_bytes()
    with pytest.raises(FederationError) as info:
        load_server_state(tmp_path)
    message = str(info.value)
    assert str(path) in message and f"schema_version {SCHEMA_VERSION + 1}" in message
    assert f"reads schema_version {SCHEMA_VERSION} and older" in message and "upgrade fedpeft" in message
    assert path.read_bytes() == before


def test_state_with_a_malformed_schema_version_is_refused(tmp_path):
    path = save_server_state(tmp_path, _state(RunConfig()))
    _rewrite_header(path, lambda header: {**header, "schema_version": "two"})
    with pytest.raises(FederationError, match="'two' is not a schema version"):
        load_server_state(tmp_path)


def test_more_rounds_may_resume_but_another_config_may_not(tmp_path):
    cfg = RunConfig()
    state = _state(cfg)
    more_rounds = dataclasses.replace(cfg, federation=FederationConfig(rounds=9))
    check_resumable(state, more_rounds, tmp_path)
    other = dataclasses.replace(cfg, federation=FederationConfig(aggregation="fedadam"))
    with pytest.raises(ConfigError, match="federation.aggregation: 'fedavg' -> 'fedadam'"):
        check_resumable(state, other, tmp_path)


@pytest.mark.parametrize("rule_name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_rule_restored_from_its_state_continues_exactly(rule_name):
    torch.manual_seed(0)
    start = {"w": torch.randn(4, 3)}
    sums = [{"w": torch.randn(4, 3)} for _ in range(3)]
    straight = build_rule(rule_name)
    state = dict(start)
    for update in sums:
        state = straight.aggregate(state, update, 2.0)
    first = build_rule(rule_name)
    resumed_state = first.aggregate(dict(start), sums[0], 2.0)
    second = build_rule(rule_name)
    second.load_state_dict(first.state_dict())
    for update in sums[1:]:
        resumed_state = second.aggregate(resumed_state, update, 2.0)
    assert torch.allclose(resumed_state["w"], state["w"])


def test_stateless_rule_refuses_foreign_state():
    with pytest.raises(FederationError, match="keeps no state"):
        build_rule("fedavg").load_state_dict({"m/w": torch.ones(1)})


def test_last_logged_round(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_logged_round(path) == -1
    path.write_text('{"round": 0}\n{"round": 1}\n')
    assert last_logged_round(path) == 1
