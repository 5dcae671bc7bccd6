"""Export a run's global adapter for serving: as a peft adapter, or merged into a full-precision copy of the base."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedpeft.composition import from_mapping
from fedpeft.errors import ModelError
from fedpeft.models.adapter_state import is_partial
from fedpeft.runs.checkpoint import find_round_dir, latest_adapter
from fedpeft.runs.run_dir import CONFIG_FILE


def is_quantized(model: Any) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def merge_into_base(peft_model: Any) -> Any:
    """Fold the adapter into the base weights; refused on a quantized base.

    Adding a LoRA delta to 4-bit weights re-quantizes the sum, so the merged model no longer computes what the
    adapter was trained to compute. Merge into a 16/32-bit copy of the base instead (what `fedpeft export --merge`
    does), or serve the adapter unmerged on the quantized base.
    """
    if is_partial(peft_model):  # the trained tensors are the base's own: nothing to fold
        return peft_model
    if is_quantized(peft_model):
        raise ModelError("refusing to merge an adapter into a quantized (4/8-bit) base: the merged weights would be "
                         "re-quantized and lose the adapter's precision. Load the base with "
                         "model.quantization = 'none' (fedpeft export --merge does this) or serve the adapter unmerged")
    return peft_model.merge_and_unload()


def export_run(run_dir: str | Path, out: str | Path, server_round: int | None = None, merge: bool = False) -> Path:
    from fedpeft.data.sites import num_labels
    from fedpeft.methods import load_saved_adapter
    from fedpeft.models.loader import load_base_model

    run_dir, out = Path(run_dir), Path(out)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(f"'{run_dir}' is not a fedpeft run directory (no {CONFIG_FILE}); pass runs/<name>")
    adapter = find_round_dir(run_dir, server_round) if server_round else latest_adapter(run_dir)
    if adapter is None or not adapter.is_dir():
        raise ModelError(f"no global adapter for round {server_round or 'latest'} in '{run_dir}/adapters'")
    if not merge:
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        return out
    cfg = from_mapping(json.loads(config_path.read_text(encoding="utf-8")), origin=str(config_path))
    model_cfg = replace(cfg.model, quantization="none")
    base, tokenizer = load_base_model(model_cfg, num_labels(cfg))
    merged = merge_into_base(load_saved_adapter(base, adapter))
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
