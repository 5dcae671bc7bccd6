"""The Flower app that a deployment runs: fedpeft's ServerApp and ClientApp with one run's resolved config.

`flwr run` ships an app directory (a FAB) to the SuperLink, which hands it to every SuperNode. fedpeft's code is
installed at each site already, so the app carries only a pyproject.toml: the component references and the run
config, flattened as Flower expects. Sites therefore run the fedpeft they installed, not code sent to them.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.config import FLOWER_ROUNDS_ALIAS, RunConfig
from fedpeft.io.atomic import write_bytes_atomic

APP_NAME = "fedpeft-run"


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def app_pyproject(cfg: RunConfig) -> str:
    flat = cfg.to_flat()
    flat[FLOWER_ROUNDS_ALIAS] = flat.pop("federation.rounds")
    lines = ["[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"', "dependencies = []", "",
             "[tool.flwr.app]", 'publisher = "fedpeft"', "", "[tool.flwr.app.components]",
             'serverapp = "fedpeft.server.app:app"', 'clientapp = "fedpeft.client.app:app"', "",
             "[tool.flwr.app.config]"]
    lines += [f'"{key}" = {_toml_value(value)}' for key, value in sorted(flat.items())]
    return "\n".join(lines) + "\n"


def write_app_dir(cfg: RunConfig, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / "pyproject.toml", app_pyproject(cfg).encode("utf-8"))
    return directory
