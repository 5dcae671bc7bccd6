"""LP-FT in a real federation under distributed DP: 2 head-only rounds, then 2 rounds of head and LoRA, each round one
Skellam release under secure aggregation, accounted in every site's ledger."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import fedpeft.server.distributed as server_distributed
from fedpeft.composition import from_mapping
from fedpeft.methods.probe import WEIGHT
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.site_budget import site_ledger_path
from fedpeft.runs.checkpoint import ADAPTER_WEIGHTS
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow


def test_a_probe_then_lora_federation_runs_under_distributed_dp(tmp_path, monkeypatch):
    dims = []
    original_collect = server_distributed.collect

    def recording_collect(secure, template, plan, **kwargs):
        dims.append((plan.dim, sorted(template)))
        return original_collect(secure, template, plan, **kwargs)

    monkeypatch.setattr(server_distributed, "collect", recording_collect)
    cfg = from_mapping({
        "model": {"name": "tiny-llama", "max_length": 32},
        "peft": {"method": "probe-lora", "probe_rounds": 2, "lora_mode": "ffa", "r": 2},
        "federation": {"rounds": 4, "num_sites": 3, "secure_aggregation": True, "aggregation": "server-sgd",
                       "eval_every": 2},
        "data": {"synthetic_examples": 240},
        "secagg": {"max_weight": 100},
        "privacy": {"dp": True, "dp_mode": "distributed", "target_epsilon": 8.0},
        "run": {"name": "lpft", "out_dir": str(tmp_path)},
    })
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["aggregated"] for r in rounds[1:]] == [True] * 4
    head, lora = dims[0][0], dims[2][0]
    assert [d for d, _ in dims] == [head, head, lora, lora] and dims[0][1] == [WEIGHT] and lora > head
    for site in ("0", "1", "2"):
        entries = PrivacyLedger(site_ledger_path(cfg, site)).entries
        assert [e.mechanism for e in entries] == ["skellam"] * 4
        assert 0 < rounds[-1]["site_epsilon"][site] <= 8.0 + 1e-6
    adapters = {n: load_file(str(result.run_dir / "adapters" / f"round-000{n}" / ADAPTER_WEIGHTS)) for n in (2, 4)}
    lora_b = [name for name in adapters[2] if "lora_B" in name]
    assert lora_b and not any("lora_A" in name for name in adapters[2])  # FFA: A is rebuilt from the seed
    assert all(not adapters[2][name].any() for name in lora_b), "the head-only rounds leave LoRA at zero"
    assert any(adapters[4][name].any() for name in lora_b), "the LoRA rounds train it"
    assert not adapters[2][WEIGHT].equal(adapters[4][WEIGHT])
