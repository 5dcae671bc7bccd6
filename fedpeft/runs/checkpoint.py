"""Global adapter checkpoints in peft's own format, so ``PeftModel.from_pretrained(base, dir)`` loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.io.atomic import settled_dir, write_bytes_atomic, write_dir_atomic

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LATEST_POINTER = "LATEST"


def round_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "adapters" / f"round-{server_round:04d}"


def find_round_dir(run_dir: Path, server_round: int) -> Path | None:
    """The round's adapter directory; mid-replacement (a crash while it was rewritten), its complete copy."""
    return settled_dir(round_dir(run_dir, server_round))


def save_global_adapter(run_dir: Path, server_round: int, state: dict[str, Any], peft_config: Any) -> Path:
    """Write the adapter atomically (a rerun round's directory is replaced as a whole: ``write_dir_atomic``), then
    point ``adapters/LATEST`` at it."""
    from safetensors.torch import save_file

    from fedpeft.models.saved import write_method_marker

    target = round_dir(run_dir, server_round)

    def fill(tmp: Path) -> None:
        peft_config.save_pretrained(str(tmp))
        write_method_marker(tmp, peft_config)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    write_dir_atomic(target, fill)
    write_bytes_atomic(run_dir / "adapters" / LATEST_POINTER, f"{target.name}\n".encode())
    return target


def latest_adapter(run_dir: Path) -> Path | None:
    """The directory ``adapters/LATEST`` names (its complete copy, mid-replacement); None before the first."""
    pointer = run_dir / "adapters" / LATEST_POINTER
    if not pointer.is_file():
        return None
    named = run_dir / "adapters" / pointer.read_text(encoding="utf-8").strip()
    return settled_dir(named) or named
