"""PEFT methods beyond plain LoRA, federated end to end: only the method's trainable tensors travel, the global
adapter loads back with peft, and training helps; IA3, AdaLoRA, the bottleneck adapter, prefix methods and layer
freezing also under DP-SGD with secure aggregation."""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.composition import from_mapping
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import get_wire_state
from fedpeft.models.loader import load_base_model
from fedpeft.runs.run_dir import MANIFEST_FILE, METRICS_FILE

pytestmark = pytest.mark.slow

CASES = {  # method options, task
    "ia3": ({"method": "ia3"}, "causal-lm"),
    "adalora": ({"method": "adalora", "r": 2, "adalora_init_r": 4, "adalora_final_rounds": 0}, "classification"),
    "dora": ({"method": "lora", "use_dora": True, "r": 4}, "classification"),
    "rslora": ({"method": "lora", "use_rslora": True, "r": 4}, "causal-lm"),
    "prompt-tuning": ({"method": "prompt-tuning", "virtual_tokens": 4}, "causal-lm"),
    "p-tuning": ({"method": "p-tuning", "virtual_tokens": 4}, "causal-lm"),
    "prefix-tuning": ({"method": "prefix-tuning", "virtual_tokens": 4}, "causal-lm"),
    "p-tuning-v2": ({"method": "p-tuning-v2", "virtual_tokens": 4}, "causal-lm"),
    "bottleneck": ({"method": "bottleneck", "r": 4}, "classification"),
    "freeze": ({"method": "freeze", "trainable_blocks": 1}, "classification"),
    "full": ({"method": "full"}, "classification"),
    "bitfit": ({"method": "bitfit"}, "classification"),
}
MODELS = {"bitfit": {"name": "minilm"}}  # Llama-family blocks have no biases for BitFit to train
PROMPT_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2")


def _config(tmp_path, name: str, peft: dict, task: str, **extra):
    sections = {
        "model": {"name": "tiny-llama", "task": task, "max_length": 32},
        "peft": peft,
        "train": {"learning_rate": _rate(peft["method"]), "local_epochs": 2, "batch_size": 16},
        "federation": {"rounds": 2, "num_sites": 3},
        "data": {"synthetic_examples": 180, "partitioner": "iid"},
        "run": {"name": name, "out_dir": str(tmp_path)},
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    return from_mapping(sections)


def _rate(method: str) -> float:
    return 0.05 if method in PROMPT_METHODS else 0.02 if method in ("ia3", "bottleneck", "bitfit", "adalora") \
        else 0.005


def _expected_wire(cfg) -> dict:
    labels = 6 if cfg.model.task == "classification" else 0
    base, _ = load_base_model(cfg.model, labels)
    return get_wire_state(wrap_with_peft(base, cfg.peft, cfg.model.task, cfg.run.seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_federates_only_its_trainable_tensors(tmp_path, case):
    from fedpeft.methods import load_saved_adapter
    from fedpeft.models.adapter_state import is_partial
    from fedpeft.simulations.engine import simulate

    peft, task = CASES[case]
    cfg = _config(tmp_path, case, peft, task, model=MODELS.get(case, {}))
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert all(r["sites_returned"] == 3 and r["aggregated"] for r in rounds[1:]), rounds
    assert rounds[2]["global_eval_loss"] < rounds[0]["global_eval_loss"], "held-out loss must go down"

    expected = _expected_wire(cfg)
    manifest = json.loads((result.run_dir / MANIFEST_FILE).read_text())
    assert set(manifest["tensors"]) == set(expected)
    values = sum(t.numel() for t in expected.values())
    assert values * 4 <= manifest["total_bytes"] <= values * 4 + 256 * len(expected)
    if case == "dora":
        assert any("lora_magnitude_vector" in name for name in expected), "DoRA's magnitudes travel too"
    if case == "ia3":
        assert all("ia3_l" in name for name in expected) and values < 1000, "IA3 sends scaling vectors only"
    if case == "adalora":
        _check_rank_budget(result.run_dir, cfg)

    if peft["method"] in PROMPT_METHODS:  # the encoder's parameters travel; checkpoints hold the computed prompts
        assert any(name.startswith("prompt_encoder.") for name in expected)

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpeft.server.initial import initial_adapter

    labels = 6 if task == "classification" else 0
    fresh, _ = load_base_model(cfg.model, labels)
    saved_dir = result.run_dir / "adapters" / "round-0002"
    saved = load_file(str(saved_dir / "adapter_model.safetensors"))
    loaded_model = load_saved_adapter(fresh, saved_dir)
    if is_partial(loaded_model):  # the checkpoint holds base tensors by their own names
        loaded = {name: p.detach() for name, p in loaded_model.named_parameters() if name in saved}
    else:
        loaded = get_peft_model_state_dict(loaded_model)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k].float(), saved[k].float()) for k in saved)
    initial = initial_adapter(cfg)
    untrained = initial.saved_format(initial.wire)
    assert any(not torch.equal(saved[k].float(), untrained[k].float()) for k in saved), "training changed it"


def _check_rank_budget(run_dir, cfg) -> None:
    """After each round the global adapter keeps exactly the scheduled number of singular values, and every site
    trained the same pattern (a masked value stays exactly zero in the average)."""
    from safetensors.torch import load_file

    from fedpeft.models.adalora import RankSchedule, singular_value_names

    schedule = RankSchedule.from_config(cfg)
    for completed in (1, 2):
        saved = load_file(str(run_dir / "adapters" / f"round-{completed:04d}" / "adapter_model.safetensors"))
        names = singular_value_names(saved)
        kept = sum(int((saved[name] != 0).sum()) for name in names)
        assert kept == schedule.budget(completed, len(names)), (completed, kept)
    assert schedule.budget(2, len(names)) == cfg.peft.r * len(names) < schedule.budget(1, len(names))


def test_ia3_with_secure_aggregation_and_what_dp_cannot_take_refused_when_the_run_is_built(tmp_path):
    from fedpeft.errors import ConfigError
    from fedpeft.simulations.engine import simulate

    cfg = _config(tmp_path, "ia3-secure", {"method": "ia3"}, "classification",
                  federation={"secure_aggregation": True, "weighting": "uniform"})
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert all(r["sites_returned"] == 3 and r["aggregated"] and not r["failures"] for r in rounds[1:]), rounds
    assert rounds[2]["global_eval_loss"] < rounds[0]["global_eval_loss"]
    for peft in ({"method": "lora", "use_dora": True}, {"method": "prompt-tuning"}):
        with pytest.raises(ConfigError, match=r"privacy\.dp.*Opacus"):
            _config(tmp_path, "refused", peft, "classification", privacy={"dp": True})


PRIVATE_CASES = {  # beyond LoRA (tests/simulations/test_private_federation.py)
    "ia3": {"method": "ia3"},
    "adalora": {"method": "adalora", "r": 2, "adalora_init_r": 4, "adalora_final_rounds": 0},
    "p-tuning-v2": {"method": "p-tuning-v2", "virtual_tokens": 4},
    "bottleneck": {"method": "bottleneck", "r": 4},
    "freeze": {"method": "freeze", "trainable_blocks": 1},
}


@pytest.mark.parametrize("case", sorted(PRIVATE_CASES))
def test_method_with_dp_and_secure_aggregation(tmp_path, case):
    from fedpeft.models.saved import saved_method
    from fedpeft.simulations.engine import simulate

    peft = PRIVATE_CASES[case]
    cfg = _config(tmp_path, f"{case}-private", peft, "classification",
                  federation={"secure_aggregation": True, "weighting": "uniform"},
                  privacy={"dp": True, "target_epsilon": 8.0})
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    assert all(r["sites_returned"] == 3 and r["aggregated"] and not r["failures"] for r in rounds[1:]), rounds
    assert all(0 < eps <= 8.0 + 1e-6 for eps in rounds[2]["site_epsilon"].values())
    marker = saved_method(result.run_dir / "adapters" / "round-0002")  # fedpeft.json where peft's files do not tell
    assert marker == (peft["method"] if peft["method"] in ("bottleneck", "freeze") else None)
