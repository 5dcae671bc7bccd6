"""Loading a global adapter that fedpeft saved, whatever its method.

peft's own files say everything for peft's methods. Two kinds need more, written beside them as ``fedpeft.json``:
the bottleneck adapter (peft would rebuild it as LoRA) and the partial methods (BitFit, layer freezing, full
fine-tuning), whose checkpoint is a set of the base's own tensors rather than a peft adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METHOD_FILE = "fedpeft.json"


def write_method_marker(directory: str | Path, peft_config: Any) -> None:
    """Beside peft's files, ``fedpeft.json`` for a config peft's own files cannot describe (a bottleneck adapter)."""
    from fedpeft.models.bottleneck import BottleneckLinear

    custom = getattr(peft_config, "_custom_modules", None) or {}
    if BottleneckLinear in custom.values():
        (Path(directory) / METHOD_FILE).write_text(json.dumps({"method": "bottleneck"}) + "\n", encoding="utf-8")


def saved_method(adapter_dir: str | Path) -> str | None:
    marker = Path(adapter_dir) / METHOD_FILE
    return json.loads(marker.read_text(encoding="utf-8")).get("method") if marker.is_file() else None


def load_saved_adapter(base: Any, adapter_dir: str | Path) -> Any:
    """``PeftModel.from_pretrained`` for a peft adapter; the base with the saved tensors for partial methods."""
    from peft import LoraConfig, PeftModel

    from fedpeft.models.bottleneck import register
    from fedpeft.models.partial import PARTIAL_METHODS, load_partial

    method = saved_method(adapter_dir)
    if method in PARTIAL_METHODS:
        return load_partial(base, Path(adapter_dir))
    if method == "bottleneck":
        config = register(LoraConfig.from_pretrained(str(adapter_dir)))
        return PeftModel.from_pretrained(base, str(adapter_dir), config=config)
    return PeftModel.from_pretrained(base, str(adapter_dir))
