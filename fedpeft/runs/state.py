"""The coordinator's resumable state: one atomically written file after every completed round.

``server_state.safetensors`` holds the global adapter (``global/<name>``), the aggregation rule's tensors
(``rule/<name>``) and, as JSON metadata, the completed round, the client-level DP releases, the sites' epsilons,
the accuracy history and the completed round's metrics record. A coordinator that crashes and restarts continues
from the round after it; a round that was under way when it crashed is run again (its checkpoint was never written).

The format's ``schema_version`` is its own safetensors metadata entry, beside the JSON, not inside it: the file is
rewritten whole every round, so one header entry costs nothing, and a reader finds it without parsing the JSON
(or the tensors), whose encoding a newer version is free to change. A file without it predates versions (1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError, FederationError, FedpeftError
from fedpeft.io.atomic import write_bytes_atomic
from fedpeft.io.schema import SCHEMA_VERSION_KEY, UNVERSIONED, check_schema_version

STATE_FILE = "server_state.safetensors"
_META_KEY = "fedpeft"
SCHEMA_VERSION = 1  # bump when the metadata or tensor layout changes meaning; readers refuse newer files
# A finished run may be extended with more rounds, and its timeout changed; anything else would mix two runs.
RESUMABLE_CHANGES = ("federation.rounds", "federation.round_timeout")


@dataclass
class ServerState:
    completed_round: int
    global_state: dict[str, Any]
    rule_state: dict[str, Any] = field(default_factory=dict)
    client_dp_releases: list[tuple[float, float, int]] = field(default_factory=list)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    accuracy_by_round: list[float | None] = field(default_factory=list)  # None: no site released a score
    last_site_accuracy: dict[str, float] = field(default_factory=dict)
    last_record: dict[str, Any] = field(default_factory=dict)  # the completed round's metrics.jsonl record
    config: dict[str, Any] = field(default_factory=dict)  # the run config (flat) the state belongs to


def save_server_state(run_dir: Path, state: ServerState) -> Path:
    from safetensors.torch import save

    tensors = {f"global/{k}": v.contiguous() for k, v in state.global_state.items()}
    tensors.update({f"rule/{k}": v.contiguous() for k, v in state.rule_state.items()})
    meta = {"completed_round": state.completed_round, "client_dp_releases": state.client_dp_releases,
            "site_epsilon": state.site_epsilon, "accuracy_by_round": state.accuracy_by_round,
            "last_site_accuracy": state.last_site_accuracy, "last_record": state.last_record,
            "config": state.config}
    path = run_dir / STATE_FILE
    header = {_META_KEY: json.dumps(meta, allow_nan=True), SCHEMA_VERSION_KEY: str(SCHEMA_VERSION)}
    write_bytes_atomic(path, save(tensors, metadata=header))
    return path


def load_server_state(run_dir: Path, *, tensors: bool = True) -> ServerState | None:
    """The last completed round's state, or None for a fresh run directory.

    ``tensors=False`` reads the header only (round, config, history), for checks before a run is accepted: the
    global adapter and the rule's tensors are then empty.
    """
    from safetensors import safe_open

    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            _check_version(path, header)  # before anything else is interpreted
            meta = json.loads(header[_META_KEY])
            loaded = {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}
        return ServerState(
            completed_round=int(meta["completed_round"]),
            global_state={k.removeprefix("global/"): v for k, v in loaded.items() if k.startswith("global/")},
            rule_state={k.removeprefix("rule/"): v for k, v in loaded.items() if k.startswith("rule/")},
            client_dp_releases=[tuple(r) for r in meta["client_dp_releases"]],
            site_epsilon=meta["site_epsilon"], accuracy_by_round=meta["accuracy_by_round"],
            last_site_accuracy=meta["last_site_accuracy"], last_record=meta["last_record"], config=meta["config"])
    except FedpeftError:
        raise
    except Exception as err:  # any damage reads the same to the operator
        raise FederationError(f"{path} cannot be read ({err}); restore it from a backup, or start the run under a "
                              "new run.name (the adapters of completed rounds are in adapters/)") from err


def _check_version(path: Path, header: dict[str, str]) -> None:
    """Refuse a state file from a newer fedpeft; safetensors metadata values are strings, hence the parse."""
    raw = header.get(SCHEMA_VERSION_KEY)
    found: object = UNVERSIONED if raw is None else (int(raw) if raw.isascii() and raw.isdigit() else raw)
    check_schema_version(found, SCHEMA_VERSION, source=f"server state {path}", error=FederationError)


def check_resumable(state: ServerState, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to continue a run directory's state under a different run config."""
    current = {k: v for k, v in cfg.to_flat().items() if k not in RESUMABLE_CHANGES}
    saved = {k: v for k, v in state.config.items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"{run_dir} holds a run (completed round {state.completed_round}) with a different run "
                          f"config ({details}); resume it with the same config, or choose a new run.name")


def check_state_matches_log(state: ServerState, logged: list[int], run_dir: Path, metrics_file: str) -> None:
    """Refuse a state that does not continue the metrics log: the log must count 0, 1, ... and end at the state's
    round (or one before it: a crash between the state write and the metrics line, which resume repairs)."""
    path, done = run_dir / metrics_file, state.completed_round
    last = logged[-1] if logged else -1
    if last > done:
        raise FederationError(
            f"{run_dir / STATE_FILE} holds completed round {done}, but {path} already logs round {last}: the state is "
            f"older than the log (restored from a backup?), and resuming would run and log rounds {done + 1}-{last} "
            f"twice. Restore the server_state.safetensors written after round {last}, or start a new run (another "
            "run.name / --name; fedpeft simulate without --resume picks a free one)")
    if last < done - 1:
        raise FederationError(
            f"{run_dir / STATE_FILE} holds completed round {done}, but {path} ends at round {last}: the lines of "
            f"rounds {last + 1}-{done - 1} are missing. Restore {metrics_file} from a backup, or start a new run "
            "(another run.name / --name)")
