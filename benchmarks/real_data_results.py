"""An append-only JSONL log of benchmarks/real_data.py's finished settings, so a long comparison can be resumed and
its rows combined across invocations (``--results FILE``).

Each line is ``{"schema_version": 1, "setup": {...}, "row": {...}, "measured": "<UTC time>"}``. A row is reused only
for the exact setup it was measured under (dataset, sites, rounds, sizes, rates, seed, ...): change any of them and
the setting runs again. Lines are only ever appended (fedpeft's append_jsonl: flushed and fsynced), never rewritten.

``schema_version`` is on every line, not in a header: appending stays a blind append (nothing is read first), and
one file combines invocations of different fedpeft versions, so each line says how it is read. Lines without it
were written before it existed (version 1). A line from a newer version stops the load with a DataError that says
"upgrade fedpeft", rather than a KeyError, or a row reused under a setup whose meaning changed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedpeft.errors import DataError
from fedpeft.io.atomic import append_jsonl
from fedpeft.io.schema import SCHEMA_VERSION_KEY, UNVERSIONED, check_schema_version

SCHEMA_VERSION = 1  # of each line; bump when a line's fields change meaning

# the options that change what a setting measures; --settings, --out, --plot, --threads, --data-dir do not
SETUP_KEYS = ("dataset", "model", "sites", "partitioner", "alpha", "rounds", "local_epochs", "batch_size", "lr",
              "dp_batch_size", "dp_lr", "dp_head_lr", "dp_lora_mode", "max_train", "max_test", "max_length",
              "eval_fraction", "seed")


def setup_of(args: argparse.Namespace) -> dict[str, Any]:
    """The setup a row was measured under; an option left unset (None) is left out, so lines written before the
    option existed still match a run that does not use it."""
    return {key: getattr(args, key) for key in SETUP_KEYS if getattr(args, key) is not None}


def load_rows(path: Path, setup: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """``{setting name: (row fields, when measured)}`` of the rows measured under ``setup``; the last one wins."""
    if not path.exists():
        return {}
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if isinstance(entry, dict):  # the version first: a newer line may lack the fields below
                check_schema_version(entry.get(SCHEMA_VERSION_KEY, UNVERSIONED), SCHEMA_VERSION,
                                     source=f"results log {path} (line {number})", error=DataError)
            entry_setup, row, measured = entry["setup"], entry["row"], entry["measured"]
            name = row["name"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SystemExit(f"--results {path}, line {number}: not a results line ({exc}); fix or remove that line, "
                             f"or pass another --results file") from exc
        if entry_setup == setup:
            found[name] = (row, measured)
    return found


def append_row(path: Path, setup: dict[str, Any], row: dict[str, Any]) -> None:
    measured = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    append_jsonl(path, {SCHEMA_VERSION_KEY: SCHEMA_VERSION, "setup": setup, "row": row, "measured": measured})
