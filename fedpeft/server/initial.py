"""The round-0 global adapter: the server builds the same peft model as the sites and takes its trainable state."""

from __future__ import annotations

from typing import Any

from fedpeft.config import RunConfig
from fedpeft.data.sites import num_labels
from fedpeft.models.adapter_state import AdapterState, get_adapter_state
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import wrap_with_peft


def initial_adapter(cfg: RunConfig) -> tuple[AdapterState, Any]:
    """Return (adapter state, peft config); the seeded init makes round 0 reproducible."""
    import torch

    base, _ = load_base_model(cfg.model, num_labels(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = wrap_with_peft(base, cfg.peft, cfg.model.task)
        state = get_adapter_state(model)
    return state, model.peft_config["default"]
