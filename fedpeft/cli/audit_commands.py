"""`fedpeft audit verify` and `audit report`: checking logs offline and the compliance report."""

from __future__ import annotations

import argparse
import sys

from fedpeft.errors import FedpeftError


def _audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="verify audit logs offline and render a compliance report")
    audit = p.add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a log's chain, signatures, sequence and timestamps (exit 0 only "
                                             "for an intact log), or cross-check a site's log against the "
                                             "coordinator's")
    verify.add_argument("log", nargs="?", help="an audit log (JSON lines)")
    verify.add_argument("--pubkey", help="the writer's trusted public key (base64, or its .pub file)")
    verify.add_argument("--site", help="a site's audit log, to cross-check against --server")
    verify.add_argument("--server", help="the coordinator's audit log")
    verify.add_argument("--site-pubkey", help="the site's trusted public key")
    verify.add_argument("--server-pubkey", help="the coordinator's trusted public key")
    report = audit.add_parser("report", help="a self-contained report of a run from the coordinator's log")
    report.add_argument("log", help="the coordinator's audit log")
    report.add_argument("--out", required=True, help="file to write (report.html or report.md)")
    report.add_argument("--format", choices=("html", "md"), default="html")
    report.add_argument("--pubkey", help="the coordinator's trusted public key")
    report.add_argument("--site-log", action="append", default=[], metavar="SITE_LOG[:SITE_PUBKEY]",
                        help="a site's log to verify and cross-check, with the site's own trusted public key after a "
                             "colon (its audit .pub file, or base64) to check the log's authorship (repeatable)")


def _public_key(value: str | None, option: str) -> str | None:
    """The base64 Ed25519 key given as ``option`` (text, or a .pub file); AuditError for anything else."""
    from pathlib import Path

    from fedpeft.audit.keys import load_public_key
    from fedpeft.errors import AuditError

    if not value:
        return None
    fix = "pass the writer's audit .pub file (written next to its audit.key) or its base64 text"
    candidate = Path(value).expanduser()
    if candidate.is_dir():
        raise AuditError(f"{option} '{value}' is a directory, not a public key; {fix}")
    if candidate.is_file():
        try:
            data = candidate.read_bytes()
        except OSError as err:
            raise AuditError(f"{option} '{value}' cannot be read ({err.strerror}); {fix}") from None
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise AuditError(f"{option} '{value}' is a binary file, not a public key (a private key or a DER file?); "
                             f"{fix}") from None
        if "PRIVATE KEY" in text:
            raise AuditError(f"{option} '{value}' is a private key, not the public key (keep it secret); {fix}")
        try:
            return load_public_key(text)
        except AuditError:
            raise AuditError(f"{option} '{value}' does not hold a base64 Ed25519 public key (32 bytes); "
                             f"{fix}") from None
    try:
        return load_public_key(value)
    except AuditError:
        looks_like_path = any(ch in value for ch in "/\\") or value.endswith((".pub", ".key", ".pem"))
        problem = "does not exist" if looks_like_path else "is neither a file nor a base64 Ed25519 public key"
        raise AuditError(f"{option} '{value}' {problem}; {fix}") from None


def _audit_log(path: str, what: str) -> str:
    """An existing, readable log file; AuditError naming it otherwise."""
    from pathlib import Path

    from fedpeft.errors import AuditError

    file = Path(path).expanduser()
    where = "the coordinator writes <run dir>/audit/coordinator.jsonl; a site, its audit_log (site.toml)"
    if not file.exists():
        raise AuditError(f"{what} '{path}' does not exist; check the path ({where})")
    if not file.is_file():
        raise AuditError(f"{what} '{path}' is not a file; pass the log file itself ({where})")
    try:
        with file.open("rb"):
            pass
    except OSError as err:
        raise AuditError(f"{what} '{path}' cannot be read ({err.strerror}); check its permissions") from None
    return str(file)


def _report_out(path: str) -> str:
    """Where the report goes: a file path whose directory exists or can be made; AuditError otherwise."""
    from pathlib import Path

    from fedpeft.errors import AuditError

    out = Path(path).expanduser()
    if out.is_dir():
        raise AuditError(f"--out '{path}' is a directory; give the report's file name, e.g. {out / 'report.html'}")
    blocker = next((parent for parent in reversed(out.parents) if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise AuditError(f"--out '{path}': '{blocker}' is a file, not a directory, so the report cannot be written "
                         "there; choose another --out")
    return str(out)


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_command == "report":
        return _audit_report(args)
    if args.site or args.server:
        if not (args.site and args.server):
            raise FedpeftError("a cross-check needs both --site SITE_LOG and --server SERVER_LOG")
        from fedpeft.audit.crosscheck import cross_check

        site_log = _audit_log(args.site, "site audit log (--site)")
        server_log = _audit_log(args.server, "coordinator audit log (--server)")
        result = cross_check(site_log, server_log, _public_key(args.site_pubkey, "--site-pubkey"),
                             _public_key(args.server_pubkey, "--server-pubkey"))
        for finding in result.findings:
            print(finding)
        print(result.summary())
        return 0 if result.ok else 1
    if not args.log:
        raise FedpeftError("give the log to verify: fedpeft audit verify LOG [--pubkey KEY]")
    from fedpeft.audit.verify import verify_log

    verification = verify_log(_audit_log(args.log, "audit log"), _public_key(args.pubkey, "--pubkey"))
    print(verification.summary())
    return 0 if verification.intact else 1


def _site_log_and_key(value: str) -> tuple[str, str | None]:
    """``SITE_LOG`` or ``SITE_LOG:SITE_PUBKEY``: a base64 key has no colon, so the last colon splits them; a log
    whose own path holds a colon is taken whole when it exists."""
    from pathlib import Path

    path, colon, key = value.rpartition(":")
    if not colon or not path or not key or Path(value).expanduser().exists():
        return _audit_log(value, "site audit log (--site-log)"), None
    return (_audit_log(path, "site audit log (--site-log)"),
            _public_key(key, f"the key in --site-log '{value}' (after the colon)"))


def _audit_report(args: argparse.Namespace) -> int:
    """Write the report whatever the logs' state (it shows the damage), and exit 1 unless the coordinator's log is
    intact and every site log given verifies and cross-checks: a report of a damaged log is evidence, not a clean
    bill. Logs whose authorship no given key checked are named on stderr (exit 0: the chain is intact)."""
    from pathlib import Path

    from fedpeft.audit.report import SiteLog, write_report

    log, key = _audit_log(args.log, "coordinator audit log"), _public_key(args.pubkey, "--pubkey")
    site_logs = [SiteLog(Path(path), site_key) for path, site_key in map(_site_log_and_key, args.site_log)]
    report = write_report(log, _report_out(args.out), fmt=args.format, public_key=key, site_logs=site_logs)
    print(f"report written to {report.path}")
    for problem in report.verdict.problems:
        print(f"fedpeft: audit report: {problem}", file=sys.stderr)
    if report.verdict.unchecked and not report.verdict.problems:
        print(f"fedpeft: audit report: chain intact, authorship not checked for: "
              f"{'; '.join(report.verdict.unchecked)}", file=sys.stderr)
    return 1 if report.verdict.problems else 0
