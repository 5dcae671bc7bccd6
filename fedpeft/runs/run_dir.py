"""Where a run writes: ``<run.out_dir>/<run.name>/`` with metrics, summary, resolved config and adapters."""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.io.atomic import write_json_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "run_config.json"
MANIFEST_FILE = "upload_manifest.json"  # names, shapes and bytes of the tensors one site upload carries


def free_run_name(out_dir: str | Path, name: str) -> str:
    """``name`` if ``out_dir/name`` holds no earlier run, else the first free ``name-2``, ``name-3``, ..."""
    out_dir = Path(out_dir)
    candidate, suffix = name, 2
    while (out_dir / candidate / METRICS_FILE).exists():
        candidate, suffix = f"{name}-{suffix}", suffix + 1
    return candidate


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.run.out_dir).expanduser() / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_FILE, cfg.to_nested())
    return run_dir


def last_logged_round(metrics_file: Path) -> int:
    """The round of the last complete line of ``metrics.jsonl`` (-1 when there is none)."""
    if not metrics_file.exists():
        return -1
    lines = [line for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return int(json.loads(lines[-1])["round"]) if lines else -1
