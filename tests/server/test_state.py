"""The coordinator's resumable state: what is saved comes back, and a different run config is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft.config import FederationConfig, RunConfig
from fedpeft.errors import ConfigError, FederationError
from fedpeft.server.run_dir import last_logged_round
from fedpeft.server.state import STATE_FILE, ServerState, check_resumable, load_server_state, save_server_state
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
