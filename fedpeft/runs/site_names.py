"""The names people know the sites by (``hospital-a``, or the values of a partition column), kept beside the
indices that the records use as keys, so that every console line, summary and report can show them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fedpeft.io.atomic import write_json_atomic

SITE_NAMES_FILE = "site_names.json"  # in the run directory: {"<site index>": "<name>"}


def write_site_names(run_dir: Path, names: Mapping[str, str]) -> None:
    write_json_atomic(run_dir / SITE_NAMES_FILE, {str(k): str(v) for k, v in names.items()})


def read_site_names(run_dir: Path) -> dict[str, str]:
    """Index -> name from the run directory; {} where none was written (a simulation without a partition column)."""
    path = run_dir / SITE_NAMES_FILE
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON object of site index -> name ({err}); delete it or fix it") from None
    if not isinstance(names, dict):
        raise ValueError(f"{path} is not a JSON object of site index -> name; delete it or fix it")
    return {str(k): str(v) for k, v in names.items()}


def site_label(names: Mapping[str, str], site: str) -> str:
    """A site as a person reads it: its name where known, else ``s<index>``; any other key (a node id that is no
    site, "secagg") stays as it is."""
    site = str(site)
    if site in names:
        return names[site]
    return f"s{site}" if site.isdigit() and len(site) < 6 else site
