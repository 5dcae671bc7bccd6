"""The `fedpeft` command: one entry with sub-commands (simulate, export, predict, evaluate, pki, server, client,
audit); each group of sub-commands lives in its own module here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedpeft.cli.audit_commands import _audit_parser, _cmd_audit
from fedpeft.cli.common import _trained_or_why, _version
from fedpeft.cli.deploy_commands import _client_parser, _cmd_client, _cmd_pki, _cmd_server, _pki_parser, _server_parser
from fedpeft.cli.run_commands import (
    PRIVATE_QUICKSTART,
    _cmd_export,
    _cmd_predict,
    _cmd_simulate,
    _export_parser,
    _predict_parsers,
    _simulate_parser,
    simulate_config,
)
from fedpeft.errors import FedpeftError

__all__ = ["PRIVATE_QUICKSTART", "_trained_or_why", "build_parser", "main", "simulate_config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _export_parser(sub)
    _predict_parsers(sub)
    _pki_parser(sub)
    _server_parser(sub)
    _client_parser(sub)
    _audit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"simulate": _cmd_simulate, "export": _cmd_export, "predict": _cmd_predict,
                    "evaluate": _cmd_predict, "pki": _cmd_pki, "server": _cmd_server,
                    "client": _cmd_client, "audit": _cmd_audit}
        return commands[args.command](args)
    except FedpeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path no check above foresaw: still a message, never a traceback
        where = f" ('{err.filename}')" if err.filename else ""
        print(f"fedpeft: error: {err.strerror or err}{where}; check the path and its permissions", file=sys.stderr)
        return 2
