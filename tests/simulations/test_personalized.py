"""Multi-task sites with local (personalized) heads, federated: one shared adapter travels, each site keeps its own
per-task heads, and nothing of a head ever leaves a site."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.models.blocks import is_head
from fedpeft.runs.run_dir import MANIFEST_FILE, METRICS_FILE

pytestmark = pytest.mark.slow


def test_local_heads_stay_at_their_sites_while_the_adapter_is_summed_securely(tmp_path):
    from safetensors.torch import load_file

    from fedpeft.client.site import HEAD_FILE
    from fedpeft.simulations.engine import simulate

    cfg = from_mapping({
        "model": {"name": "minilm", "max_length": 32}, "peft": {"r": 4, "head": "local"},
        "train": {"local_epochs": 2},
        "federation": {"rounds": 2, "num_sites": 3, "secure_aggregation": True, "weighting": "uniform"},
        "data": {"source": "synthetic-multitask", "synthetic_examples": 180},
        "run": {"name": "local-heads", "out_dir": str(tmp_path)}})
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert all(r["sites_returned"] == 3 and r["aggregated"] and not r["failures"] for r in rounds[1:]), rounds
    assert rounds[2]["global_eval_loss"] < rounds[0]["global_eval_loss"], "personalized held-out loss goes down"

    uploaded = json.loads((result.run_dir / MANIFEST_FILE).read_text())["tensors"]
    assert uploaded and not any(is_head(name) for name in uploaded), "no head tensor in any upload"
    saved = load_file(str(result.run_dir / "adapters" / "round-0002" / "adapter_model.safetensors"))
    assert saved and not any(is_head(name) for name in saved), "the global adapter carries no head"

    heads = [load_file(str(result.run_dir / "sites" / f"site-{i}" / HEAD_FILE)) for i in range(3)]
    assert all(set(head) == set(heads[0]) and head for head in heads)
    name = next(iter(heads[0]))
    assert heads[0][name].shape[0] == 5, "one row per label of both tasks (3 topics + 2 urgencies)"
    assert not torch.equal(heads[0][name], heads[1][name]), "each site trained its own head"
