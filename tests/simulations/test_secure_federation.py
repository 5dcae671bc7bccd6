"""A federation with secure aggregation: the same result as plain FedAvg (within the fixed-point bound), and the
server-side code is only ever handed masked vectors and the decoded sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedpeft.secagg.server as secagg_server
import fedpeft.server.federation as federation
from fedpeft.composition import from_mapping
from fedpeft.simulations.engine import simulate
from fedpeft.strategies.fedavg import FedAvg

pytestmark = pytest.mark.slow


def _config(tmp_path, name: str, secure: bool):
    return from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "train": {"learning_rate": 5e-3},
        "federation": {"rounds": 2, "num_sites": 3, "secure_aggregation": secure},
        "data": {"synthetic_examples": 240},
        "run": {"name": name, "out_dir": str(tmp_path)},
    })


def test_secure_fedavg_equals_plain_fedavg_and_the_server_sees_only_masked_vectors_and_the_sum(tmp_path,
                                                                                              monkeypatch):
    plain = simulate(_config(tmp_path, "plain", secure=False))

    seen_uploads: list[np.ndarray] = []
    rule_inputs: list[dict] = []
    original_vector, original_aggregate = secagg_server.masked_vector, FedAvg.aggregate

    def recording_vector(reply):
        seen_uploads.append(original_vector(reply))
        return seen_uploads[-1]

    def recording_aggregate(self, global_state, update_sum, weight_sum):
        rule_inputs.append({k: v.clone() for k, v in update_sum.items()})
        return original_aggregate(self, global_state, update_sum, weight_sum)

    def no_plain_path(*args, **kwargs):
        raise AssertionError("the plain path that handles individual updates ran under secure aggregation")

    monkeypatch.setattr(secagg_server, "masked_vector", recording_vector)
    monkeypatch.setattr(FedAvg, "aggregate", recording_aggregate)
    monkeypatch.setattr(federation, "collect_updates", no_plain_path)
    secure = simulate(_config(tmp_path, "secure", secure=True))

    assert len(rule_inputs) == 2, "the rule is called once per round, with the decoded sum"
    assert len(seen_uploads) == 6 and all(u.dtype == np.uint32 for u in seen_uploads)
    for upload in seen_uploads:  # each masked upload alone looks uniform over Z_2^32
        assert abs(float(np.mean(upload / 2.0**32)) - 0.5) < 0.02
    # Round 1 starts from the same global adapter on both sides, so the only difference is the fixed-point error
    # of the secure sum. (Later rounds also differ through training: Adam's normalised steps on near-zero LoRA
    # gradients amplify tiny input differences.)
    first = {name: load_file(str(run.run_dir / "adapters" / "round-0001" / "adapter_model.safetensors"))
             for name, run in (("plain", plain), ("secure", secure))}
    worst = max(float((first["secure"][k] - t).abs().max()) for k, t in first["plain"].items())
    print("max |secure - plain| after round 1:", worst)
    assert worst < 1e-5
    assert secure.summary["final_accuracy"] == pytest.approx(plain.summary["final_accuracy"], abs=0.05)


def test_ffa_with_dp_sgd_noise_shares_and_secure_aggregation_together(tmp_path):
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "peft": {"lora_mode": "ffa"},
        "federation": {"rounds": 2, "num_sites": 4, "min_sites": 3, "secure_aggregation": True,
                       "weighting": "uniform"},
        "data": {"synthetic_examples": 240},
        "privacy": {"dp": True, "noise_multiplier": 1.0, "client_dp": "distributed", "client_clip": 0.5},
        "run": {"name": "all", "out_dir": str(tmp_path)},
    })
    result = simulate(cfg)
    import json

    rounds = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aggregated"] and r["sites_returned"] == 4 for r in rounds[1:])
    assert len(rounds[2]["site_epsilon"]) == 4 and rounds[2]["client_dp_epsilon"] > 0
    from fedpeft.methods import wrap_with_peft
    from fedpeft.models.adapter_state import get_wire_state
    from fedpeft.models.loader import load_base_model

    wire = get_wire_state(wrap_with_peft(load_base_model(cfg.model, 6)[0], cfg.peft, "classification"))
    values = sum(t.numel() for t in wire.values())
    assert rounds[1]["bytes_per_client"] <= 1.05 * 4 * values  # B + head only, as one uint32 vector
    manifest = json.loads((result.run_dir / "upload_manifest.json").read_text())
    assert list(manifest["tensors"]) == ["secagg-masked"] and manifest["tensors"]["secagg-masked"]["dtype"] == "uint32"
    saved = load_file(str(result.run_dir / "adapters" / "round-0002" / "adapter_model.safetensors"))
    assert any(".lora_A." in name for name in saved), "the checkpoint is complete: the frozen A is saved too"


@pytest.mark.parametrize("secure", [False, True])
def test_heterogeneous_ranks_federate_and_the_checkpoint_loads(tmp_path, secure):
    import json

    from peft import PeftModel

    from fedpeft.models.loader import load_base_model
    from fedpeft.server.initial import initial_adapter

    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "peft": {"r": 8, "site_ranks": "2,4,8"},
        "train": {"learning_rate": 5e-3},
        "federation": {"rounds": 2, "num_sites": 3, "secure_aggregation": secure},
        "data": {"synthetic_examples": 180},
        "run": {"name": f"het-{secure}", "out_dir": str(tmp_path)},
    })
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aggregated"] and r["sites_returned"] == 3 for r in rounds[1:])
    saved = str(result.run_dir / "adapters" / "round-0002")
    loaded = PeftModel.from_pretrained(load_base_model(cfg.model, 6)[0], saved)
    assert loaded.peft_config["default"].r == 8
    state = load_file(saved + "/adapter_model.safetensors")
    initial = initial_adapter(cfg).wire
    a_name = next(n for n in state if ".lora_A." in n)
    assert not torch.equal(state[a_name][4:], initial[a_name][4:]), "the rank-8 site trained the top slices"
