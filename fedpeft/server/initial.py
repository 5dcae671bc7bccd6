"""The round-0 global adapter: the server builds the same peft model as the sites and takes its trainable state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.audit.payload import model_fingerprint
from fedpeft.config import RunConfig
from fedpeft.data.sites import num_labels
from fedpeft.errors import ConfigError
from fedpeft.methods import wrap_with_peft
from fedpeft.models.adapter_state import (
    AdapterState,
    check_adapter_state,
    get_adapter_state,
    get_wire_state,
    is_prompt_learning,
    saved_format,
)
from fedpeft.models.blocks import is_head
from fedpeft.models.loader import load_base_model
from fedpeft.models.peft_model import method_config
from fedpeft.runs.checkpoint import ADAPTER_WEIGHTS


@dataclass(frozen=True)
class InitialAdapter:
    wire: AdapterState  # the trainable tensors: what travels and what the rule aggregates
    frozen: AdapterState  # adapter tensors that never train (FFA-LoRA's A): needed to save a loadable adapter
    peft_config: Any
    base_fingerprint: str = ""  # SHA-256 of the base model's weights, for the audit log
    model: Any = None  # the server's peft model: turns the wire state into peft's save format
    local_head: bool = False  # peft.head = "local": heads stay at the sites, the global adapter has none

    def saved_format(self, wire: AdapterState) -> AdapterState:
        """What a checkpoint holds: peft's own format (computed prompts for prompt/prefix methods)."""
        saved = saved_format(self.model, wire) if self.model is not None else {**self.frozen, **wire}
        return {name: t for name, t in saved.items() if not (self.local_head and is_head(name))}


def initial_adapter(cfg: RunConfig) -> InitialAdapter:
    """The round-0 adapter; the seeded init is the same in every process (sites rebuild the frozen parts)."""
    base, _ = load_base_model(cfg.model, num_labels(cfg))
    fingerprint = model_fingerprint(base)
    model = wrap_with_peft(base, cfg.peft, cfg.model.task, cfg.run.seed)
    local_head = cfg.peft.head == "local"
    wire = get_wire_state(model, local_head)
    frozen = {name: t for name, t in get_adapter_state(model).items()
              if name not in wire and not (local_head and is_head(name))}
    if cfg.run.init_from:
        wire = continued_from(cfg.run.init_from, wire, frozen)
    keep = model if is_prompt_learning(model) else None  # LoRA/IA3 save as they travel: no model kept in memory
    return InitialAdapter(wire, frozen, method_config(model), fingerprint, keep, local_head)


def continued_from(adapter_dir: str, wire: AdapterState, frozen: AdapterState) -> AdapterState:
    """Continual federated fine-tuning: round 0 starts from an earlier run's global adapter (peft format)."""
    import torch
    from safetensors.torch import load_file

    path = Path(adapter_dir).expanduser() / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"run.init_from = {adapter_dir!r}: no {ADAPTER_WEIGHTS} there; point it at an adapter "
                          "directory of an earlier run, e.g. runs/NAME/adapters/round-0005")
    saved = load_file(str(path))
    check_adapter_state({**wire, **frozen}, saved, source=f"run.init_from adapter {path}")
    for name, tensor in frozen.items():  # e.g. FFA-LoRA's A: sites rebuild it from run.seed, it cannot change
        if not torch.equal(saved[name].float(), tensor):
            raise ConfigError(f"run.init_from: the frozen tensor '{name}' differs from this run's (seeded) one; "
                              "continue with the earlier run's run.seed and peft settings")
    return {name: saved[name].float().contiguous() for name in wire}
