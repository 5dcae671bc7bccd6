"""What the coordinator and each site write to their audit logs, and where the logs and keys live.

The coordinator's log (``<run dir>/audit/coordinator.jsonl``) records the run's start (config and its hash, library
versions, base-model fingerprint, PEFT, aggregation, DP and secure-aggregation settings, expected sites), every
round (who was asked, who returned, who dropped or refused, whether the sum was decoded, client-level DP noise, the
aggregate update's norm, ε per site, payload digests, the new global adapter's SHA-256, metrics) and the run's end.
A site's log records what left the site each round (size and SHA-256 of the payload, ε after the round, the hash of
its ledger line) — never data or the update itself. Those hashes anchor the site's privacy ledger: before it trains,
a site reads them back (``ledger_anchors``) and refuses when its ledger no longer holds the lines it released.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.audit.keys import load_or_create_key, load_private_key
from fedpeft.audit.log import GENESIS, AuditLog, canonical, check_record_version, line_hash
from fedpeft.config import RunConfig
from fedpeft.errors import AuditError

COORDINATOR_LOG = "coordinator.jsonl"
VERSIONED = ("fedpeft", "flwr", "torch", "transformers", "peft", "opacus", "bitsandbytes", "cryptography")


def audit_dir(run_dir: Path) -> Path:
    return run_dir / "audit"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def config_sha256(cfg: RunConfig) -> str:
    return hashlib.sha256(canonical(cfg.to_flat())).hexdigest()


class CoordinatorAudit:
    """The coordinator's signed account of the run."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        key_file = Path(cfg.run.audit_key).expanduser() if cfg.run.audit_key else None
        key = load_private_key(key_file) if key_file else load_or_create_key(audit_dir(run_dir) / "coordinator.key")
        self.log = AuditLog(audit_dir(run_dir) / COORDINATOR_LOG, key, "coordinator")
        self.cfg = cfg

    def run_start(self, base_fingerprint: str, peft_config: Any, resumed_after: int | None, *,
                  site_names: dict[str, str] | None = None) -> None:
        """``site_names``: site index -> the name people know it by, for the report."""
        if resumed_after is not None:
            self.log.append("run-resumed", {"after_round": resumed_after, "config_sha256": config_sha256(self.cfg)})
            return
        c = self.cfg
        self.log.append("run-start", {
            "public_key": self.log.public_key, "run": c.run.name, "config": c.to_nested(),
            "config_sha256": config_sha256(c), "versions": library_versions(),
            "base_model": {"name": c.model.name, "quantization": c.model.quantization, "sha256": base_fingerprint},
            "peft": _json_safe(peft_config.to_dict()) if hasattr(peft_config, "to_dict") else str(peft_config),
            "aggregation": c.federation.aggregation, "weighting": c.federation.weighting,
            "dp": {k: v for k, v in c.to_nested()["privacy"].items() if k not in ("policy_file", "ledger_dir")},
            "secure_aggregation": c.federation.secure_aggregation, "secagg": c.to_nested()["secagg"],
            "expected_sites": c.federation.num_sites, "min_sites": c.federation.min_sites,
            "site_names": dict(site_names or {})})

    def round(self, data: dict[str, Any]) -> None:
        self.log.append("round", _json_safe(data))

    def refusal(self, server_round: int, site: str, *, rule: str, reason: str) -> None:
        """A site's refusal as it arrived: a typed rule and its reason (never parsed back out of a string)."""
        self.log.append("refusal", {"round": server_round, "site": site, "rule": rule, "reason": reason})

    def run_end(self, final_adapter: str | None, adapter_sha256: str | None, summary: dict[str, Any]) -> None:
        self.log.append("run-end", {"final_adapter": final_adapter, "final_adapter_sha256": adapter_sha256,
                                    "rounds": summary.get("rounds"), "final_accuracy": summary.get("final_accuracy"),
                                    "site_epsilon": summary.get("site_epsilon"),
                                    "client_dp_epsilon": summary.get("client_dp_epsilon")})


class SiteAudit:
    """A site's own signed record of what left it."""

    def __init__(self, log_path: Path, key_path: Path, site: str) -> None:
        key = load_or_create_key(key_path)
        self.log = AuditLog(log_path, key, f"site:{site}")
        self.site = site
        if not log_path.exists() or log_path.stat().st_size == 0:
            self.log.append("site-start", {"public_key": self.log.public_key, "site": site})

    def release(self, run: str, server_round: int, payload_sha256: str, payload_bytes: int, *, secure: bool,
                privacy: dict[str, float], ledger_line_sha256: str | None) -> None:
        self.log.append("release", {"run": run, "round": server_round, "payload_sha256": payload_sha256,
                                    "payload_bytes": payload_bytes, "secure_aggregation": secure,
                                    "epsilon": privacy.get("epsilon"), "ledger_line_sha256": ledger_line_sha256,
                                    # distributed DP: the Skellam variance this site added (integer units)
                                    **({"noise_share": privacy["noise-share"]} if "noise-share" in privacy else {})})

    def refusal(self, run: str, server_round: int, reason: str) -> None:
        self.log.append("refusal", {"run": run, "round": server_round, "reason": reason})

    def evaluation(self, run: str, server_round: int, metrics: dict[str, float]) -> None:
        self.log.append("evaluation", {"run": run, "round": server_round, "metrics_sent": metrics})


@dataclass(frozen=True)
class LedgerAnchor:
    """One release in a site's signed log, naming the privacy-ledger line it recorded."""

    log_line: int  # 1-based line of the release record in the site's audit log
    run: str
    round: int
    epsilon: float | None  # the site's cumulative epsilon after the release, as logged
    ledger_line_sha256: str


def ledger_anchors(log_path: str | Path) -> list[LedgerAnchor]:
    """The releases of a site's audit log that name a ledger line, oldest first; [] when the log does not exist.

    The log's hash chain is checked as it is read (its signatures are for ``fedpeft audit verify``: whoever can
    rewrite a site's files can also use its key). A partial last line (a crash mid-append) is not a record and is
    skipped, as the next append moves it aside. AuditError names the first line whose chain or form is broken, or
    a record from a newer fedpeft."""
    path = Path(log_path)
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().split(b"\n")[:-1]  # the bytes after the last newline are a torn line, if any
    except OSError as err:
        raise AuditError(f"audit log {path} cannot be read ({err})") from None
    anchors, prev = [], GENESIS
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not a record")
        except ValueError as err:
            raise AuditError(f"audit log {path} line {number} is not a record ({err})") from None
        check_record_version(record, f"audit log {path} (line {number})")
        if record.get("prev") != prev:
            raise AuditError(f"audit log {path} line {number}: its 'prev' hash does not match the line before it (a "
                             "line was edited, removed, inserted or reordered)")
        prev = line_hash(line)
        data = record.get("data")
        if record.get("kind") != "release" or not isinstance(data, dict):
            continue
        sha, server_round, eps = data.get("ledger_line_sha256"), data.get("round"), data.get("epsilon")
        if not isinstance(sha, str) or not sha:
            continue  # a release without DP records no ledger line
        if not isinstance(server_round, int) or isinstance(server_round, bool):
            raise AuditError(f"audit log {path} line {number}: a release without a round number ({server_round!r})")
        anchors.append(LedgerAnchor(number, str(data.get("run", "")), server_round,
                                    float(eps) if isinstance(eps, int | float) else None, sha))
    return anchors


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v),
                                 allow_nan=True))
