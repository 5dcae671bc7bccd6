from __future__ import annotations

import pytest
import torch

from fedpeft.cli import main as cli_main
from fedpeft.composition import from_mapping
from fedpeft.errors import ModelError
from fedpeft.methods import wrap_with_peft
from fedpeft.models.loader import load_base_model
from fedpeft.runs.checkpoint import save_global_adapter
from fedpeft.runs.export import merge_into_base
from fedpeft.runs.run_dir import prepare_run_dir
from fedpeft.server.initial import initial_adapter


def _run_with_adapter(tmp_path):
    """A run directory as the server leaves it: config, and a trained (here: perturbed) NF4-base adapter."""
    cfg = from_mapping({"model": {"name": "tiny-llama", "task": "causal-lm"}, "run": {"out_dir": str(tmp_path)}})
    initial = initial_adapter(cfg)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in initial.wire.items()}
    run_dir = prepare_run_dir(cfg)
    save_global_adapter(run_dir, 1, {**initial.frozen, **state}, initial.peft_config)
    return cfg, run_dir


def test_merging_into_a_quantized_base_is_refused_with_an_explanation():
    cfg = from_mapping({"model": {"name": "tiny-llama", "task": "causal-lm", "quantization": "nf4"}})
    model = wrap_with_peft(load_base_model(cfg.model, 0)[0], cfg.peft, "causal-lm")
    with pytest.raises(ModelError, match="refusing to merge.*quantization = 'none'"):
        merge_into_base(model)


def test_export_merge_writes_a_full_precision_model_equal_to_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, run_dir = _run_with_adapter(tmp_path)
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    base, _ = load_base_model(from_mapping({"model": {"name": "tiny-llama", "task": "causal-lm",
                                                      "quantization": "none"}}).model, 0)
    unmerged = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "round-0001")).to("cpu")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    merged.eval(), unmerged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-4)


def test_export_without_merge_copies_the_adapter_and_bad_paths_are_clear(tmp_path, capsys):
    _, run_dir = _run_with_adapter(tmp_path)
    assert cli_main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert cli_main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not a fedpeft run directory" in capsys.readouterr().err
