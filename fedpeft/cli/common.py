"""What the sub-commands share: --set overrides, loading a run config, checks and the exit code of a run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from fedpeft.errors import FedpeftError


def _parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    import tomllib

    overrides: dict[str, object] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise FedpeftError(f"--set {pair!r}: write overrides as section.key=value (e.g. federation.rounds=3)")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value  # a bare word is a string, as on Flower's --run-config
    return overrides


def _directory_for(path: str, what: str) -> None:
    """``path`` is, or can be made, a directory: nothing on the way is a file (FedpeftError naming it otherwise)."""
    from pathlib import Path

    target = Path(path).expanduser()
    blocker = next((p for p in [*reversed(target.parents), target] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FedpeftError(f"{what} '{path}': '{blocker}' is a file, not a directory; choose another directory")


def _warn(cfg: Any) -> None:
    """Settings a run accepted knowingly, said once where it starts."""
    from fedpeft.composition import run_warnings

    for warning in run_warnings(cfg):
        print(f"fedpeft: warning: {warning}", file=sys.stderr)


def _trained_or_why(run_dir: Any) -> int:
    """0 when some round of the run aggregated an update; otherwise 1, saying why no site trained (a run that only
    evaluated the initial adapter produced nothing)."""
    import json
    from pathlib import Path

    metrics = Path(run_dir) / "metrics.jsonl"
    rounds = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] >= 1:
                rounds.append(record)
    if any(record.get("aggregated") for record in rounds):
        return 0
    why = []
    for record in rounds[-1:]:
        why += [f"site {site} refused: {reason}" for site, reason in (record.get("refusals") or {}).items()]
        why += [f"{site} failed: {reason}" for site, reason in (record.get("failures") or {}).items()]
        why += [f"round {record['round']}: {record['unchanged_because']}"] if record.get("unchanged_because") else []
    detail = "; ".join(why) if why else ("no round was run" if not rounds else "too few usable updates each round")
    print(f"fedpeft: error: no site trained in any round of {run_dir}, so the run produced nothing: {detail}",
          file=sys.stderr)
    return 1


def _config_arguments(p: argparse.ArgumentParser, *, config_help: str, set_example: str) -> None:
    """--config, --no-privacy and --set, the same for every command that builds a run config."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--no-privacy", action="store_true",
                   help="without a --config: the non-private quick start (LoRA, plain FedAvg) instead of the private "
                        "default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one config value; repeatable{set_example}")


def _load_config(path: str | None, overrides: dict[str, object]):
    from fedpeft.composition import from_mapping, load_toml
    from fedpeft.config import RunConfig, unflatten

    if path:
        return load_toml(path, overrides)
    return from_mapping(unflatten(overrides), origin="command line") if overrides else RunConfig()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fedpeft {version('fedpeft')}"
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "fedpeft (version unknown: not installed; install it with pip install -e .)"
