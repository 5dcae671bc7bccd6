"""What the coordinator and each site write to their audit logs, and where the logs and keys live.

The coordinator's log (``<run dir>/audit/coordinator.jsonl``) records the run's start (config and its hash, library
versions, base-model fingerprint, PEFT, aggregation, DP and secure-aggregation settings, expected sites), every
round (who was asked, who returned, who dropped or refused, whether the sum was decoded, client-level DP noise, the
aggregate update's norm, ε per site, payload digests, the new global adapter's SHA-256, metrics) and the run's end.
A site's log records what left the site each round (size and SHA-256 of the payload, ε after the round, the hash of
its ledger line) — never data or the update itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedpeft.audit.keys import load_or_create_key, load_private_key
from fedpeft.audit.log import AuditLog, canonical
from fedpeft.config import RunConfig

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

    def run_start(self, base_fingerprint: str, peft_config: Any, resumed_after: int | None) -> None:
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
            "expected_sites": c.federation.num_sites, "min_sites": c.federation.min_sites})

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


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set) else str(v),
                                 allow_nan=True))
