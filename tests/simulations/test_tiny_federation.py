"""A real federation through Flower's simulation engine (Ray) with the tiny Llama, for both tasks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import get_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.runs.run_dir import MANIFEST_FILE, METRICS_FILE
from fedpeft.server.initial import initial_adapter
from fedpeft.simulations.engine import simulate

pytestmark = pytest.mark.slow


def _config(tmp_path, task: str):
    return from_mapping({
        "model": {"name": "tiny-llama", "task": task, "max_length": 48},
        "train": {"learning_rate": 5e-3, "local_epochs": 2, "batch_size": 16},
        "federation": {"rounds": 2, "num_sites": 3},
        "data": {"synthetic_examples": 240, "partitioner": "dirichlet" if task == "classification" else "iid"},
        "run": {"name": task, "out_dir": str(tmp_path)},
    })


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_three_sites_two_rounds_ship_only_adapter_tensors(tmp_path, task):
    from peft import PeftModel

    cfg = _config(tmp_path, task)
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["sites_returned"] == 3 and not r["failures"] for r in rounds[1:])

    labels = 6 if task == "classification" else 0
    base, tokenizer = load_base_model(cfg.model, labels)
    local = wrap_with_peft(base, cfg.peft, task)
    expected = get_adapter_state(local)
    manifest = json.loads((result.run_dir / MANIFEST_FILE).read_text())
    assert set(manifest["tensors"]) == set(expected), "the wire carries exactly the adapter (+head) tensors"
    assert not any("embed_tokens" in n or n.endswith("proj.weight") for n in manifest["tensors"])
    adapter_bytes = sum(t.numel() * 4 for t in expected.values())
    assert adapter_bytes <= manifest["total_bytes"] <= adapter_bytes + 256 * len(expected)  # npy headers only
    assert all(r["bytes_per_client"] == manifest["total_bytes"] for r in rounds[1:])

    assert rounds[2]["global_eval_loss"] < rounds[0]["global_eval_loss"], "held-out loss must go down"
    for server_round in (1, 2):
        saved = result.run_dir / "adapters" / f"round-{server_round:04d}"
        fresh, _ = load_base_model(cfg.model, labels)
        loaded = PeftModel.from_pretrained(fresh, str(saved))
        state = get_adapter_state(loaded)
        assert set(state) == set(expected)
    if task == "causal-lm":  # the causal-LM default base is NF4 (QLoRA); its adapter must serve a 32-bit base
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
        full_base, _ = load_base_model(replace(cfg.model, quantization="none"), labels)
        served = PeftModel.from_pretrained(full_base, str(result.run_dir / "adapters" / "round-0002"))
        assert set(get_adapter_state(served)) == set(expected)
    initial = initial_adapter(cfg).wire
    assert any(not torch.equal(state[k], initial[k]) for k in initial), "training changed the global adapter"


def test_sites_of_a_partition_column_keep_their_names_on_the_console_in_the_summary_and_the_audit_log(
        tmp_path, capsys):
    from fedpeft.composition import load_toml

    hospitals = ["clinic-b", "clinic-a", "clinic-c"]
    rows = "".join(f"ticket {i} about {'ab'[i % 2]},{'ab'[i % 2]},{hospitals[i % 3]}\n" for i in range(60))
    (tmp_path / "rows.csv").write_text("text,label,hospital\n" + rows)
    (tmp_path / "run.toml").write_text(
        '[model]\nname = "tiny-llama"\nmax_length = 16\n[federation]\nrounds = 1\nmin_sites = 3\n'
        '[data]\nsource = "rows.csv"\npartitioner = "column"\npartition_column = "hospital"\n'
        f'[run]\nname = "named"\nout_dir = "{tmp_path}"\n')
    cfg = load_toml(tmp_path / "run.toml")  # three sites: the column's values, none given by hand
    result = simulate(cfg)
    names = {"0": "clinic-a", "1": "clinic-b", "2": "clinic-c"}
    assert result.summary["site_names"] == names
    console = capsys.readouterr().out
    assert "clinic-a=" in console and "clinic-c=" in console and " s0=" not in console, console[-2000:]
    start = json.loads((result.run_dir / "audit" / "coordinator.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "run-start" and start["data"]["site_names"] == names, start.keys()
