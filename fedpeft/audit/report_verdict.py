"""What the report's banner says, and the verification section behind it.

Three levels, because "the chain is intact" and "we know who wrote it" are different findings:

- ``ok`` (green): the coordinator's log verifies under a public key the auditor gave, and so does every site log
  given, each under its own site's given key, and each site's account matches the coordinator's;
- ``unchecked`` (amber): nothing is damaged, but some log was checked only against the key its own first record
  names (no trusted key was given): that proves the chain was not edited, not who wrote it — a writer that rewrites
  its whole log names its own new key;
- ``damaged`` (red): the coordinator's log or a site log is damaged (including a site's ε going down), a log does not
  verify under the key given for it, or a site's own account contradicts the coordinator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.audit.crosscheck import CrossCheck, cross_check
from fedpeft.audit.keys import key_id
from fedpeft.audit.report_model import Run, Section, SiteLog, Table, Text, fmt, site_label
from fedpeft.audit.verify import Verification

OK, UNCHECKED, DAMAGED = "ok", "unchecked", "damaged"


@dataclass(frozen=True)
class SiteCheck:
    site_log: SiteLog
    check: CrossCheck

    @property
    def authorship_checked(self) -> bool:
        return self.site_log.public_key is not None


@dataclass(frozen=True)
class Verdict:
    level: str  # OK, UNCHECKED or DAMAGED
    banner: Text
    problems: tuple[str, ...] = ()  # each damage or mismatch, in words (the command prints them and exits 1)
    unchecked: tuple[str, ...] = ()  # the logs whose authorship no trusted key checked


def check_sites(site_logs: Sequence[SiteLog], log_path: Path, public_key: str | None) -> list[SiteCheck]:
    """Verify each site log under its own given key (else its embedded one) and cross-check it against the
    coordinator's log."""
    return [SiteCheck(s, cross_check(s.path, log_path, site_key=s.public_key, server_key=public_key))
            for s in site_logs]


def _coordinator_damage(verification: Verification) -> str:
    first = verification.damage[0]
    if len(verification.privacy_failures) == len(verification.damage):
        return (f"PRIVACY FAILURE — the log's chain and signatures verify, but a site's ε decreased: {first} "
                f"({len(verification.damage)} record(s)). A site's ε never goes down: its privacy ledger was "
                "reset, cut or edited, and the ε shown below under-reports what it spent.")
    return (f"LOG DAMAGED — first damage: {first} ({len(verification.damage)} problem(s)). "
            "The records that still parse are shown below; they are not trustworthy.")


def _site_damage(run: Run, site: SiteCheck) -> str:
    who = f"{site_label(run, site.check.site)}'s own log ({site.site_log.path})"
    if not site.check.site_log.intact:
        return f"SITE LOG DAMAGED — {who}: first damage: {site.check.site_log.damage[0]}."
    return f"CROSS-CHECK FAILED — {who} contradicts the coordinator's: {site.check.summary()}"


def verdict(run: Run, verification: Verification, public_key: str | None, sites: Sequence[SiteCheck]) -> Verdict:
    problems = ([verification.summary()] if not verification.intact else []) + [
        s.check.summary() for s in sites if not s.check.ok]
    unchecked = (["the coordinator's log (no --pubkey given)"] if public_key is None else []) + [
        f"{site_label(run, s.check.site)}'s log (no key given for {s.site_log.path})"
        for s in sites if not s.authorship_checked]
    if problems:
        first = _coordinator_damage(verification) if not verification.intact else \
            _site_damage(run, next(s for s in sites if not s.check.ok))
        more = f" ({len(problems) - 1} more problem(s): see Verification.)" if len(problems) > 1 else ""
        return Verdict(DAMAGED, Text(first + more, "banner damaged"), tuple(problems), tuple(unchecked))
    if unchecked:
        return Verdict(UNCHECKED, Text(
            f"Chain intact, authorship not checked for: {'; '.join(unchecked)}. Nothing was edited, cut or "
            "reordered as far as each log's own embedded key tells, but a writer that rewrote its whole log would "
            "name its own new key: give the trusted public keys (--pubkey, --site-log LOG:KEY) to check who wrote "
            "them.", "banner unchecked"), (), tuple(unchecked))
    sites_text = (f"; {len(sites)} site log(s) intact, each signed by its own site's given key, and their accounts "
                  "match the coordinator's" if sites else "")
    key = key_id(public_key) if public_key else "?"
    return Verdict(OK, Text(f"Log verified: intact ({len(verification.records)} records, chain and signatures check "
                            f"out under the given key {key}){sites_text}.", "banner ok"))


def _css(intact: bool, keyed: bool) -> str:
    return "damaged" if not intact else "ok" if keyed else "unchecked"


def verification_section(run: Run, verification: Verification, public_key: str | None,
                         sites: Sequence[SiteCheck]) -> Section:
    blocks: list[Any] = [Text(verification.summary(), _css(verification.intact, public_key is not None))]
    if not verification.intact:
        blocks.append(Table(["kind", "line", "seq", "detail"],
                            [[d.kind, fmt(d.line), fmt(d.seq), d.detail] for d in verification.damage], "damage"))
    for site in sites:
        check = site.check
        blocks.append(Text(f"Site log of {site_label(run, check.site)}: {check.site_log.summary()}",
                           _css(check.site_log.intact, site.authorship_checked)))
        blocks.append(Text(check.summary(), "ok" if check.ok else "damaged"))
        if check.findings:
            blocks.append(Table(["severity", "site", "round", "kind", "detail"],
                                [[f.severity, site_label(run, f.site), fmt(f.round), f.kind, f.detail]
                                 for f in check.findings], "findings"))
    return Section("verification", "Verification", blocks)
