"""Real (tiny) federations with one malicious site (issue #18 §2): it cannot take the federation down.

The site's reply is altered where it reaches the server (the simulation's Grid), which is exactly what a site
controls: what its reply carries. Identity is the Flower node that delivered the reply, which a site cannot alter.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from safetensors.torch import load_file

from fedpeft import wire
from fedpeft.cli import _trained_or_why
from fedpeft.composition import from_mapping
from fedpeft.runs.run_dir import METRICS_FILE, SUMMARY_FILE
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow

ATTACKER = 2  # the partition of the malicious site


def _config(tmp_path, name: str, rounds: int, **federation):
    return from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "train": {"learning_rate": 5e-3},
        "federation": {"rounds": rounds, "num_sites": 3, "aggregation": "fedavg", **federation},
        "data": {"synthetic_examples": 240},
        "run": {"name": name, "out_dir": str(tmp_path)},
    })


def _attack(monkeypatch, tamper: Callable[[Message, int], None], message_type: str = MessageType.TRAIN) -> None:
    """``tamper(reply, round)`` runs on each ``message_type`` reply of the attacker's node (found by the partition
    its honest first reply names) before the server reads it."""
    original = InMemoryGrid.send_and_receive
    attacker: dict[str, int] = {}

    def send_and_receive(self, messages, *args, **kwargs):
        replies = list(original(self, messages, *args, **kwargs))
        for reply in replies:
            if reply.has_error() or reply.metadata.message_type != message_type:
                continue
            metrics = reply.content.get(wire.METRICS)
            if "node" not in attacker and metrics is not None and metrics.get(wire.PARTITION_ID) == ATTACKER:
                attacker["node"] = reply.metadata.src_node_id
            if reply.metadata.src_node_id == attacker.get("node"):
                tamper(reply, int(reply.metadata.group_id or 0))
        return replies

    monkeypatch.setattr(InMemoryGrid, "send_and_receive", send_and_receive)


def _rounds(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()][1:]


def _only_failure(record: dict) -> str:
    assert len(record["failures"]) == 1, record["failures"]
    return next(iter(record["failures"].values()))


def test_a_site_sending_1e20_is_clipped_and_the_federation_keeps_learning(tmp_path, monkeypatch):
    def huge(reply: Message, _: int) -> None:
        update = reply.content[wire.ADAPTER].to_torch_state_dict()
        reply.content[wire.ADAPTER] = ArrayRecord({name: t * 1e20 for name, t in update.items()})

    _attack(monkeypatch, huge)
    result = simulate(_config(tmp_path, "huge", rounds=3))
    rounds = _rounds(result.run_dir)
    assert all(r["aggregated"] and r["sites_returned"] == 3 and not r["failures"] for r in rounds), \
        "every round aggregates, and the honest sites' updates stay usable (no NaN) after the attack"
    assert all(list(r["clipped_update_norms"]) == [str(ATTACKER)] for r in rounds)
    assert all(r["clipped_update_norms"][str(ATTACKER)] > 1e19 for r in rounds)
    saved = load_file(str(result.run_dir / "adapters" / "round-0003" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_example_counts_are_clipped_or_the_site_dropped_and_named(tmp_path, monkeypatch):
    claims = {1: 1e9, 2: float("inf"), 3: 0, 4: -5}

    def claim(reply: Message, server_round: int) -> None:
        reply.content[wire.METRICS][wire.NUM_EXAMPLES] = claims[server_round]

    _attack(monkeypatch, claim)
    result = simulate(_config(tmp_path, "examples", rounds=4))
    first, *dropped = _rounds(result.run_dir)
    assert first["aggregated"] and first["sites_returned"] == 3 and not first["failures"]
    assert first["clipped_examples"] == {str(ATTACKER): 1e9}
    for record, value in zip(dropped, ("inf", "0", "-5"), strict=True):
        reason = _only_failure(record)
        assert record["aggregated"] and record["sites_returned"] == 2, record  # its failure, not the round's
        assert reason.startswith("rejected:") and f"site {ATTACKER} claims {value}" in reason
    summary = json.loads((result.run_dir / SUMMARY_FILE).read_text())
    assert summary["unchanged_reason"] is None
    saved = load_file(str(result.run_dir / "adapters" / "round-0004" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_a_site_naming_another_sites_partition_is_refused_and_named(tmp_path, monkeypatch):
    def spoof(reply: Message, _: int) -> None:
        reply.content[wire.METRICS][wire.PARTITION_ID] = 0  # "my update and my epsilon are site 0's"

    _attack(monkeypatch, spoof)
    result = simulate(_config(tmp_path, "spoof", rounds=1))
    (record,) = _rounds(result.run_dir)
    reason = _only_failure(record)
    assert f"is site {ATTACKER}, but its reply names partition 0" in reason
    assert record["aggregated"] and record["sites_returned"] == 2


def test_a_tampered_secure_weight_sum_fails_the_round_and_an_unchanged_run_ends_non_zero(tmp_path, monkeypatch,
                                                                                          capsys):
    def weight(reply: Message, _: int) -> None:
        masked = reply.content[wire.SA_MASKED]
        key = next(iter(masked))
        ring = masked[key].numpy().copy()
        ring[-1] = ring[-1] + np.array(2 ** (8 * ring.itemsize - 1), dtype=ring.dtype)  # the weight coordinate
        reply.content[wire.SA_MASKED] = ArrayRecord({key: Array(ring)})

    _attack(monkeypatch, weight)
    run_dir = simulate(_config(tmp_path, "secure", rounds=1, secure_aggregation=True)).run_dir
    (record,) = _rounds(run_dir)
    assert not record["aggregated"] and record["integrity"].startswith("integrity failure")
    assert "decoded weight sum is -" in record["integrity"] and record["unchanged_because"] == record["integrity"]
    assert not (run_dir / "adapters" / "round-0001").exists()
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert "never changed in 1 rounds" in summary["unchanged_reason"]
    assert "integrity failure" in summary["unchanged_reason"]
    assert _trained_or_why(run_dir) == 1  # `fedpeft simulate` / `fedpeft server` exit 1, saying why
    assert "round 1: integrity failure" in capsys.readouterr().err
