"""Schema versions of the files fedpeft persists, and the one check every reader runs on them.

Each persisted format (server state, privacy ledger, audit log, benchmark results log) carries a
``schema_version``: an integer that its writer bumps when it changes what the file means, so that an older fedpeft
meeting a file from a newer one stops with a clear "upgrade fedpeft" error instead of crashing on an unknown field
or, worse, silently misreading one whose meaning changed. Every format keeps its own version number (its own
``SCHEMA_VERSION`` next to its writer), because the formats change independently: a new ledger line must not make
an older fedpeft refuse an audit log that did not change.

Files written before versions existed have no field; they are version ``UNVERSIONED`` (1), which is what they are,
so they keep loading. This module sits in the lowest layer (``fedpeft.io``): it imports only ``fedpeft.errors`` and
the standard library, so that every other layer can use it.
"""

from __future__ import annotations

from importlib import metadata

from fedpeft.errors import FedpeftError

SCHEMA_VERSION_KEY = "schema_version"  # the field (JSON key, safetensors metadata key) every format stores it under
UNVERSIONED = 1  # the version of a file written before versions were recorded: read it as version 1


def is_schema_version(value: object) -> bool:
    """Whether ``value`` is a well-formed version (an integer >= 1), so a reader can call a bad one damage."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_schema_version(found: object, supported: int, *, source: str,
                         error: type[FedpeftError] = FedpeftError) -> int:
    """The version ``found`` in ``source`` (a file, or a file and line), when this fedpeft can read it.

    Raises ``error`` (the reader's own domain error, so that callers' existing handling applies) when ``found`` is
    not a version at all, or is newer than ``supported``, the newest version this fedpeft reads; the message names
    the source, both versions and the fix, because the user who meets it has a file, not a stack trace.
    """
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:  # spelled out so found narrows to int
        raise error(f"{source}: {SCHEMA_VERSION_KEY} {found!r} is not a schema version (an integer >= 1); the file "
                    "is damaged or was not written by fedpeft")
    if found > supported:
        raise error(f"{source} was written by a newer fedpeft ({SCHEMA_VERSION_KEY} {found}); this fedpeft"
                    f"{_installed_version()} reads {SCHEMA_VERSION_KEY} {supported} and older. To read it, "
                    "upgrade fedpeft (pip install --upgrade fedpeft); the file was left unchanged")
    return found


def _installed_version() -> str:
    """`` <version>`` of the installed distribution, so the message says what to upgrade from; empty if unknown."""
    try:
        return f" {metadata.version('fedpeft')}"
    except metadata.PackageNotFoundError:
        return ""
