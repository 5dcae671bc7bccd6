"""The marker a checkpoint carries when peft's own files cannot say how to load it.

peft's own files say everything for peft's methods. Two kinds need more, written beside them as ``fedpeft.json``:
the bottleneck adapter (peft would rebuild it as LoRA) and the partial methods (BitFit, layer freezing, full
fine-tuning), whose checkpoint is a set of the base's own tensors rather than a peft adapter. Loading dispatches on
it through the method registry (``fedpeft.methods.load_saved_adapter``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METHOD_FILE = "fedpeft.json"
MARKER_ATTRIBUTE = "fedpeft_method"  # set on a peft config by a method whose checkpoints need the marker


def mark_config(peft_config: Any, method: str) -> Any:
    """Tag ``peft_config`` so that checkpoints saved with it carry ``fedpeft.json`` naming ``method``."""
    setattr(peft_config, MARKER_ATTRIBUTE, method)
    return peft_config


def write_method_marker(directory: str | Path, peft_config: Any) -> None:
    """Beside peft's files, ``fedpeft.json`` for a config peft's own files cannot describe."""
    method = getattr(peft_config, MARKER_ATTRIBUTE, None)
    if method:
        (Path(directory) / METHOD_FILE).write_text(json.dumps({"method": method}) + "\n", encoding="utf-8")


def saved_method(adapter_dir: str | Path) -> str | None:
    marker = Path(adapter_dir) / METHOD_FILE
    return json.loads(marker.read_text(encoding="utf-8")).get("method") if marker.is_file() else None
