"""Cross-check the coordinator's account of a site against the site's own log.

For every round of the coordinator's run: if the coordinator says the site's update was aggregated, the site must
have logged a release for that run and round with the same payload digest and the same ε; if the coordinator says
the site refused, the site must have logged the refusal. A release the coordinator does not account for is reported
too (a warning: an upload can be lost legitimately, e.g. in an aborted secure round).

ε only grows: a round where the coordinator records the site's ε below what the site's own log recorded at an
earlier release (in this run or any earlier one) is a mismatch (``epsilon decreased``), and so is an ε that goes
down within either log (``verify_log`` names those records, and either log then fails its verification).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.audit.verify import Verification, verify_log

EPSILON_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Finding:
    severity: str  # "mismatch" (fails the check) or "warning"
    site: str
    round: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.severity}: site {self.site}, round {self.round}: {self.kind}: {self.detail}"


@dataclass
class CrossCheck:
    site: str
    run: str
    site_log: Verification
    server_log: Verification
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.site_log.intact and self.server_log.intact
                and not any(f.severity == "mismatch" for f in self.findings))

    def summary(self) -> str:
        if self.ok:
            return (f"site {self.site}, run {self.run!r}: the coordinator's account matches the site's own log "
                    f"({len(self.findings)} warnings)")
        broken = [v.summary() for v in (self.site_log, self.server_log) if not v.intact]
        first = next((str(f) for f in self.findings if f.severity == "mismatch"), "")
        return f"site {self.site}, run {self.run!r}: CROSS-CHECK FAILED — " + "; ".join(broken + [first])


def cross_check(site_log: str | Path, server_log: str | Path, site_key: str | None = None,
                server_key: str | None = None) -> CrossCheck:
    site_v, server_v = verify_log(site_log, site_key), verify_log(server_log, server_key)
    site = str(site_v.records[0].get("writer", "")).removeprefix("site:") if site_v.records else "?"
    start = next((r for r in server_v.records if r.get("kind") == "run-start"), None)
    run = str(start["data"].get("run", "")) if start else ""
    result = CrossCheck(site, run, site_v, server_v)
    claims = _coordinator_claims(server_v.records, site)
    own = _site_account(site_v.records, run)
    for server_round, claim in sorted(claims.items()):
        result.findings += _compare(site, server_round, claim, own.get(server_round))
        result.findings += _below_earlier(site, server_round, claim, own.get(server_round))
    for server_round, entry in sorted(own.items()):
        if entry["kind"] == "release" and server_round not in claims:
            result.findings.append(Finding("warning", site, server_round, "unaccounted release",
                                           "the site released an update the coordinator's log does not account for "
                                           "(dropped or aborted round)"))
    return result


def _coordinator_claims(records: list[dict[str, Any]], site: str) -> dict[int, dict[str, Any]]:
    """round -> what the coordinator says about this site (the last record of a round wins: a redone round)."""
    claims: dict[int, dict[str, Any]] = {}
    for record in records:
        data = record.get("data", {})
        if record.get("kind") != "round" or data.get("initial_evaluation"):
            continue
        if site in data.get("payload_sha256", {}):
            claims[int(data["round"])] = {"kind": "release", "payload": data["payload_sha256"][site],
                                          "epsilon": data.get("site_epsilon", {}).get(site)}
        elif site in data.get("refusals", {}):
            claims[int(data["round"])] = {"kind": "refusal"}
    return claims


def _site_account(records: list[dict[str, Any]], run: str) -> dict[int, dict[str, Any]]:
    """round -> the site's own record of it, with ``earlier``: the largest ε the site's log recorded before it (in
    any run; None when none)."""
    own: dict[int, dict[str, Any]] = {}
    highest: float | None = None
    for record in records:
        data = record.get("data", {})
        if record.get("kind") in ("release", "refusal") and data.get("run") == run:
            own[int(data["round"])] = {"kind": record["kind"], "payload": data.get("payload_sha256"),
                                       "epsilon": data.get("epsilon"), "earlier": highest}
        eps = data.get("epsilon") if record.get("kind") == "release" else None
        if isinstance(eps, int | float) and not isinstance(eps, bool):
            highest = float(eps) if highest is None else max(highest, float(eps))
    return own


def _below_earlier(site: str, server_round: int, claim: dict[str, Any], own: dict[str, Any] | None) -> list[Finding]:
    """The coordinator's ε for the site this round is below an ε the site recorded before this round's release."""
    eps, earlier = claim.get("epsilon"), (own or {}).get("earlier")
    if claim["kind"] != "release" or not isinstance(eps, int | float) or earlier is None:
        return []
    if float(eps) >= earlier * (1.0 - EPSILON_TOLERANCE):
        return []
    return [Finding("mismatch", site, server_round, "epsilon decreased",
                    f"the coordinator records ε {float(eps):.6g}, below the ε {earlier:.6g} the site's own log "
                    "recorded at an earlier release: the site's privacy ledger was reset, cut or edited")]


def _compare(site: str, server_round: int, claim: dict[str, Any], own: dict[str, Any] | None) -> list[Finding]:
    if own is None:
        return [Finding("mismatch", site, server_round, "forged participation",
                        f"the coordinator records a {claim['kind']} by this site, the site's log has none")]
    if own["kind"] != claim["kind"]:
        return [Finding("mismatch", site, server_round, "participation differs",
                        f"the coordinator records a {claim['kind']}, the site a {own['kind']}")]
    findings = []
    if claim["kind"] == "release" and claim["payload"] != own["payload"]:
        findings.append(Finding("mismatch", site, server_round, "payload differs",
                                f"coordinator {str(claim['payload'])[:16]}…, site {str(own['payload'])[:16]}…"))
    if claim["kind"] == "release" and not _same_epsilon(claim["epsilon"], own["epsilon"]):
        findings.append(Finding("mismatch", site, server_round, "epsilon differs",
                                f"coordinator {claim['epsilon']}, site {own['epsilon']}"))
    return findings


def _same_epsilon(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= EPSILON_TOLERANCE
