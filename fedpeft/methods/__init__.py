"""Federated PEFT methods, one registered class per ``peft.method`` value (see ``fedpeft.methods.base``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.config import PeftConfig
from fedpeft.methods import (  # noqa: F401  (registers them)
    adalora,
    bottleneck,
    ia3,
    lora,
    partial,
    probe,
    probe_lora,
    prompt,
)
from fedpeft.methods.base import (
    FederatedMethod,
    build_method,
    method_class,
    method_for,
    register_method,
    registered_methods,
)
from fedpeft.models.saved import saved_method

__all__ = ["FederatedMethod", "build_method", "load_saved_adapter", "method_class", "method_for", "register_method",
           "registered_methods", "wrap_with_peft"]


def wrap_with_peft(model: Any, cfg: PeftConfig, task: str, seed: int = 0) -> Any:
    """``model`` (a frozen base) made trainable by the method ``cfg`` names; only what travels trains."""
    return method_for(cfg, task).wrap(model, seed)


def load_saved_adapter(base: Any, adapter_dir: str | Path) -> Any:
    """A checkpoint fedpeft saved, whatever its method: ``fedpeft.json`` names the method where peft's own files
    cannot (bottleneck, partial methods); otherwise peft's loader."""
    method = saved_method(adapter_dir)
    if method is None:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir))
    return method_class(method)(PeftConfig(method=method), task="").load_saved(base, str(adapter_dir))
