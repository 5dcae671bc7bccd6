"""The round-0 global adapter: the server builds the same peft model as the sites and takes its trainable state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpeft.audit.payload import model_fingerprint
from fedpeft.config import RunConfig
from fedpeft.data.sites import num_labels
from fedpeft.models.adapter_state import AdapterState, get_adapter_state, get_wire_state
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import wrap_with_peft


@dataclass(frozen=True)
class InitialAdapter:
    wire: AdapterState  # the trainable tensors: what travels and what the rule aggregates
    frozen: AdapterState  # adapter tensors that never train (FFA-LoRA's A): needed to save a loadable adapter
    peft_config: Any
    base_fingerprint: str = ""  # SHA-256 of the base model's weights, for the audit log


def initial_adapter(cfg: RunConfig) -> InitialAdapter:
    """The round-0 adapter; the seeded init is the same in every process (sites rebuild the frozen parts)."""
    base, _ = load_base_model(cfg.model, num_labels(cfg))
    fingerprint = model_fingerprint(base)
    model = wrap_with_peft(base, cfg.peft, cfg.model.task, cfg.run.seed)
    wire = get_wire_state(model)
    frozen = {name: t for name, t in get_adapter_state(model).items() if name not in wire}
    return InitialAdapter(wire, frozen, model.peft_config["default"], fingerprint)
