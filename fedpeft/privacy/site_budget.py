"""A site's privacy gate for one round: its policy is checked, its budget is checked before training, and the
release is committed to its ledger after training. Everything it knows is on disk, so a restart changes nothing.

Two kinds of round: local DP-SGD (``plan`` / ``commit``: Gaussian releases) and distributed DP (``plan_distributed``
/ ``commit_distributed``: one Poisson-subsampled Skellam release per round, its noise shared among the cohort under
secure aggregation). Both go to the same ledger and the same budget; a history holding a Skellam release is
accounted by RDP whatever ``privacy.accountant`` says (``accounting.history_epsilon``).

Before it plans a round, a site checks that its ledger is the one it has been writing: every ledger line its signed
audit log records as released (``ledger_line_sha256``) must still be in the ledger, unchanged, and the newest line's
epsilon must not be below what the recorded releases compose to. A ledger that is missing, shorter, or edited is a
refusal (LedgerCorrupted, rule ``privacy_ledger``) naming the file, the mismatch and the fix; it is never reset.

A site's ledger belongs to the site, not to a run (``site_ledger_path``): a simulated site's ledger is keyed by
its index and the data that decide its rows, so a run of any name on the same data continues its budget."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.audit.trail import LedgerAnchor, ledger_anchors
from fedpeft.config import RunConfig
from fedpeft.data.sites import SYNTHETIC_SOURCES
from fedpeft.errors import AuditError, LedgerCorrupted, PrivacyBudgetExceeded, PrivacyError
from fedpeft.privacy.accounting import SkellamRelease, check_skellam_release
from fedpeft.privacy.ledger import LedgerEntry, PrivacyLedger
from fedpeft.privacy.planning import noise_multiplier_for, skellam_mu_for
from fedpeft.privacy.policy import PrivacyRequest, SitePolicy, check_request, load_policy, missing_policy

LEDGER_FILE = "privacy_ledger.jsonl"
SITE_PLACEHOLDER = "{site}"
RUN_PLACEHOLDER = "{run}"  # in privacy.ledger_dir: a ledger per run, on purpose (each run starts its sites afresh)
SITES_DIR = "sites"  # <run.out_dir>/sites/<data key>/site-N: simulated sites' own files, outside every run directory
LEDGER_RULE = "privacy_ledger"  # the refusal's rule when the ledger does not match the site's own records


@dataclass(frozen=True)
class RoundPlan:
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    predicted_epsilon: float  # cumulative, if all planned steps run


@dataclass(frozen=True)
class DistributedRoundPlan:
    """One distributed-DP round as this site will release and record it: one Poisson-subsampled Skellam release.

    ``mu``, ``l1`` and ``l2`` are in integer units (``scale`` per unit of gradient); ``mu`` is the variance of the
    noise in the decoded *sum*, of which this site adds ``noise_share`` = ``mu / cohort``.
    """

    mu: float  # total Skellam variance of the sum's noise
    sample_rate: float  # q: each of this site's rows is in the round's batch with this probability
    l1: float
    l2: float
    scale: float
    cohort: int  # m: the fewest sites whose shares are in any decoded sum
    max_grad_norm: float  # the per-example clipping norm (gradient units)
    predicted_epsilon: float  # cumulative, after this round

    @property
    def noise_share(self) -> float:
        """The Skellam variance this site adds: ``mu / cohort``."""
        return self.mu / self.cohort

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian-equivalent noise multiplier ``sqrt(mu) / l2`` (display; the ledger line records it)."""
        return math.sqrt(self.mu) / self.l2

    def release(self) -> SkellamRelease:
        return SkellamRelease(self.sample_rate, self.mu, self.l1, self.l2, 1)


def site_ledger_path(cfg: RunConfig, site: str) -> Path:
    """Where a site without a node-local ``ledger-path`` keeps its ledger (and, beside it, its audit log and key).

    * ``privacy.ledger_dir`` = "" (default): ``<run.out_dir>/sites/<data key>/site-N/privacy_ledger.jsonl``. The
      path does not depend on ``run.name``: a simulated site is its index on the data that decide its rows
      (``site_data_key``), and its budget carries over to every run on them, whatever the run is called.
    * ``privacy.ledger_dir`` = a directory: ``<dir>/site-N/privacy_ledger.jsonl``; with ``{site}`` in it,
      ``<dir with {site} replaced>/privacy_ledger.jsonl``. ``{run}`` is replaced by ``run.name``: a ledger per run,
      which starts each run's sites at zero. That is the one way to start afresh, and it is written in the config.
    """
    configured = cfg.privacy.ledger_dir
    if not configured:
        return Path(cfg.run.out_dir).expanduser() / SITES_DIR / site_data_key(cfg) / f"site-{site}" / LEDGER_FILE
    configured = configured.replace(RUN_PLACEHOLDER, cfg.run.name)
    if SITE_PLACEHOLDER in configured:
        return Path(configured.replace(SITE_PLACEHOLDER, site)).expanduser() / LEDGER_FILE
    return Path(configured).expanduser() / f"site-{site}" / LEDGER_FILE


def site_data_key(cfg: RunConfig) -> str:
    """A directory name for the data that decide a simulated site's rows: the source (a file by its absolute
    path), the synthetic size, the partitioner and its settings, the held-out fraction, the task, ``run.seed``
    (it draws the synthetic rows, the partition and the split) and the number of sites. Nothing else (the run's
    name, model, method, rounds, privacy settings) changes which rows a site holds, so nothing else changes its
    ledger. Readable prefix + 12 hex digits of the SHA-256 of these values."""
    d = cfg.data
    synthetic = d.source in SYNTHETIC_SOURCES
    source = d.source if synthetic else str(Path(d.source).expanduser().resolve())
    identity = {"source": source, "synthetic_examples": d.synthetic_examples if synthetic else None,
                "partitioner": d.partitioner, "dirichlet_alpha": d.dirichlet_alpha,
                "partition_column": d.partition_column, "eval_fraction": d.eval_fraction,
                "task_column": d.task_column, "task": cfg.model.task, "seed": cfg.run.seed,
                "sites": cfg.federation.num_sites}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    stem = d.source if synthetic else Path(source).stem
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem)[:40].strip('.-') or 'data'}-{digest}"


def run_site_dir(cfg: RunConfig, site: str) -> Path:
    """A simulated site's files that belong to one run (its local head): ``<run dir>/sites/site-N``. Before
    ledgers left the run directory, the site's ledger was kept here too (``legacy_ledger_path``)."""
    return Path(cfg.run.out_dir).expanduser() / cfg.run.name / SITES_DIR / f"site-{site}"


def legacy_ledger_path(cfg: RunConfig, site: str) -> Path:
    """Where a fedpeft before site-scoped ledgers kept a simulated site's ledger: inside the run directory."""
    return run_site_dir(cfg, site) / LEDGER_FILE


def site_policy(cfg: RunConfig, site: str, override: str | None = None) -> SitePolicy | None:
    """The site's own policy: a node-local path (deployment) or ``privacy.policy_file``.

    In simulations ``privacy.policy_file`` may contain ``{site}`` to give each simulated site its own file. A file
    that does not exist is an error (a typo must not turn every site's policy off), unless the run sets
    ``privacy.policy_optional = true``: then a site without its file runs under the run config alone. The run config
    never makes a site's own (node-local) policy file optional.
    """
    path = override or cfg.privacy.policy_file
    if not path:
        return None
    templated = SITE_PLACEHOLDER in path
    resolved = Path(path.replace(SITE_PLACEHOLDER, site)).expanduser()
    if not resolved.is_file():
        if cfg.privacy.policy_optional and not override:
            return None
        raise missing_policy(resolved, templated=templated)
    return load_policy(resolved)


class SiteBudget:
    """Policy + ledger of one site, for one round at a time."""

    def __init__(self, cfg: RunConfig, site: str, policy: SitePolicy | None, ledger_path: Path, *,
                 audit_log: Path | None = None) -> None:
        """``audit_log``: the site's own signed log, whose releases anchor the ledger (None: nothing anchors it)."""
        self.cfg, self.site, self.policy = cfg, site, policy
        self.audit_log = audit_log
        self.ledger = PrivacyLedger(ledger_path)

    @property
    def budget(self) -> float:
        """The run's target, lowered by the site's own policy where that is stricter."""
        target = self.cfg.privacy.target_epsilon
        return min(target, self.policy.max_epsilon) if self.policy else target

    def request(self) -> PrivacyRequest:
        return PrivacyRequest.from_config(self.cfg)

    def check_policy(self) -> None:
        """Raise PolicyViolation naming the rule if the run config asks what the site's policy forbids."""
        if self.policy is not None:
            check_request(self.policy, self.request())

    def check_ledger(self) -> None:
        """Raise LedgerCorrupted (a refusal, before anything is trained or released) when the ledger is not the one
        this site has been writing: a line its signed audit log records as released is missing or changed (the
        ledger was deleted, cut short, replaced or edited), the newest line's epsilon is below what the recorded
        releases compose to (an edit), or the ledger was left behind in the run directory by an older fedpeft."""
        self._check_not_left_behind()
        self._check_anchored()
        try:
            self.ledger.check_recorded_epsilon()
        except LedgerCorrupted as err:
            raise LedgerCorrupted(str(err), rule=LEDGER_RULE) from None

    def _check_anchored(self) -> None:
        if self.audit_log is None:
            return
        try:
            anchors = ledger_anchors(self.audit_log)
        except AuditError as err:
            raise LedgerCorrupted(
                f"site {self.site}: its audit log {self.audit_log}, which records the privacy-ledger lines it "
                f"released, is damaged ({err}), so the ledger {self.ledger.path} cannot be checked against it; the "
                f"site trains nothing this round. Run `fedpeft audit verify {self.audit_log}` and restore the log "
                "from a backup", rule=LEDGER_RULE) from None
        present = set(self.ledger.line_sha256s())
        missing = next((anchor for anchor in anchors if anchor.ledger_line_sha256 not in present), None)
        if missing is not None:
            raise LedgerCorrupted(self._mismatch(missing, len(anchors)), rule=LEDGER_RULE)

    def _mismatch(self, anchor: LedgerAnchor, released: int) -> str:
        path, entries = self.ledger.path, self.ledger.entries
        eps = f", epsilon {anchor.epsilon:.6g}" if anchor.epsilon is not None else ""
        release = (f"the release of run {anchor.run!r} round {anchor.round}{eps} (audit log {self.audit_log} line "
                   f"{anchor.log_line}, ledger line SHA-256 {anchor.ledger_line_sha256})")
        same = [i for i, e in enumerate(entries, start=1) if e.run == anchor.run and e.round == anchor.round]
        if not path.exists():
            what = (f"privacy ledger {path} is missing, but the site's signed audit log records {released} "
                    f"release(s) with ledger lines; the first of them is {release}")
        elif same:
            what = (f"privacy ledger {path} line {same[0]} (run {anchor.run!r}, round {anchor.round}) is not the line "
                    f"the site released: its SHA-256 differs from {release}. The line was edited")
        else:
            last = entries[-1] if entries else None
            holds = (f"it holds {len(entries)} line(s), the last run {last.run!r} round {last.round} epsilon "
                     f"{last.epsilon:.6g}" if last else "it holds no line")
            what = (f"privacy ledger {path} is shorter than the site's own record: {holds}, but the signed audit log "
                    f"records {release}, which is not in it. Lines were cut off, or the ledger was replaced")
        return (f"site {self.site}: {what}. The site trains nothing until its ledger matches its audit log: a ledger "
                "that lost or lowered releases under-counts the privacy this site has spent. Restore the ledger from "
                "a backup holding that line (its SHA-256 must match); never delete or edit it. Starting a site "
                "afresh on purpose is a new site: give it a new ledger directory (privacy.ledger_dir, e.g. with "
                "{run} for a ledger per run, or the node's ledger-path and audit log)")

    def _check_not_left_behind(self) -> None:
        """A simulated site's ledger used to live in its run directory; one left there must not be forgotten."""
        if self.cfg.privacy.ledger_dir or self.ledger.path != site_ledger_path(self.cfg, self.site):
            return
        legacy = legacy_ledger_path(self.cfg, self.site)
        if not legacy.is_file():
            return
        try:
            head = PrivacyLedger(legacy).last_line_sha256()
        except LedgerCorrupted:
            head = "?"  # unreadable: it is not in the site's ledger either
        if head is None or head in self.ledger.line_sha256s():
            return
        raise LedgerCorrupted(
            f"site {self.site}: run {self.cfg.run.name!r} kept this site's privacy ledger in its run directory "
            f"({legacy}, as fedpeft did before a simulated site's ledger belonged to the site), and its releases are "
            f"not in the site's ledger {self.ledger.path}; the site trains nothing this round. Move {legacy} to "
            f"{self.ledger.path} (when that file does not exist yet), or keep a ledger per run on purpose with "
            f"privacy.ledger_dir = '{Path(self.cfg.run.out_dir) / RUN_PLACEHOLDER / SITES_DIR}'", rule=LEDGER_RULE)

    def _check_not_released(self, server_round: int) -> None:
        if self.ledger.released(self.cfg.run.name, server_round):
            raise PrivacyError(
                f"site {self.site}: round {server_round} of run {self.cfg.run.name!r} is already in the privacy ledger "
                f"{self.ledger.path} (the coordinator restarted mid-round?); training it again would be a second "
                "release of the same round, so the site sits this round out and trains the next one")

    def _remaining_rounds(self, server_round: int) -> int:
        """This round and every later one of the run: what a derived noise level must leave budget for."""
        return max(self.cfg.federation.rounds - server_round + 1, 1)

    def plan(self, server_round: int, sample_rate: float, steps: int) -> RoundPlan:
        """Raise PolicyViolation / PrivacyBudgetExceeded / PrivacyError before any training happens."""
        self.check_policy()
        self.check_ledger()
        self._check_not_released(server_round)
        p = self.cfg.privacy
        sigma = p.noise_multiplier or self._derived_noise(server_round, sample_rate, steps)
        if self.policy is not None:
            sigma = max(sigma, self.policy.min_noise_multiplier)  # more noise than asked is always allowed
        predicted = self.ledger.check((sigma, sample_rate, steps), p.delta, self.budget, p.accountant)
        return RoundPlan(sigma, sample_rate, steps, p.max_grad_norm, predicted)

    def _derived_noise(self, server_round: int, sample_rate: float, steps: int) -> float:
        """The noise that spends exactly the budget if this and every remaining round of the run is joined."""
        remaining = self._remaining_rounds(server_round)
        return noise_multiplier_for(self.budget, self.cfg.privacy.delta, sample_rate, steps * remaining,
                                    accountant=self.cfg.privacy.accountant, history=self.ledger.history())

    def commit(self, server_round: int, plan: RoundPlan, steps_taken: int) -> float:
        """Record the release that happened; returns the site's cumulative epsilon after it."""
        release = (plan.noise_multiplier, plan.sample_rate, steps_taken)
        spent = self.ledger.cumulative_epsilon(release, self.cfg.privacy.delta, self.cfg.privacy.accountant)
        self.ledger.commit(LedgerEntry(round=server_round, steps=steps_taken, sample_rate=plan.sample_rate,
                                       noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                                       epsilon=spent, delta=self.cfg.privacy.delta,
                                       accountant=self.cfg.privacy.accountant, run=self.cfg.run.name))
        return spent

    def plan_distributed(
        self,
        server_round: int,
        *,
        sample_rate: float,
        l1: float,
        l2: float,
        scale: float,
        cohort: int,
        mu: float | None = None,
    ) -> DistributedRoundPlan:
        """Plan one distributed-DP round; raise PolicyViolation / PrivacyBudgetExceeded / PrivacyError before the
        site releases anything (nothing is written).

        ``mu`` (total variance, integer units) is taken as given, or else derived as ``_derived_noise`` derives a
        noise multiplier: the smallest that spends exactly the budget left if this and every remaining round of
        the run is joined, one Skellam release per round. Either way it is raised to the policy's
        ``min_noise_multiplier`` (Gaussian-equivalent ``sqrt(mu)/l2``; more noise is always allowed), and the
        round is refused with PrivacyBudgetExceeded if the budget cannot take it (already spent, or this round's
        release would pass it). ``l1``, ``l2`` and ``scale`` come from the rounding (``skellam.rounded_*_bound``);
        ``cohort`` is the fewest sites whose shares are in any decoded sum, so the sum carries variance >= ``mu``.
        """
        self.check_policy()
        self.check_ledger()
        self._check_not_released(server_round)
        p = self.cfg.privacy
        if not isinstance(cohort, numbers.Integral) or isinstance(cohort, bool) or cohort < 1:
            raise PrivacyError(f"cohort={cohort!r} is invalid; it must be an integer >= 1 (sites in every sum)")
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not 0 < scale < math.inf:
            raise PrivacyError(f"scale={scale!r} is invalid; it must be a finite number > 0 (integer units per unit)")
        if mu is not None:
            given = check_skellam_release(SkellamRelease(sample_rate, mu, l1, l2, 1), where="planned release")
        else:
            given = check_skellam_release(SkellamRelease(sample_rate, 1.0, l1, l2, 1), where="planned release")
            given = SkellamRelease(given.sample_rate, self._derived_mu(server_round, given), given.l1, given.l2, 1)
        planned = given
        if self.policy is not None:
            floor = (self.policy.min_noise_multiplier * planned.l2) ** 2
            if floor > planned.mu:
                planned = SkellamRelease(planned.sample_rate, floor, planned.l1, planned.l2, 1)
        predicted = self.ledger.check(planned, p.delta, self.budget, p.accountant)
        return DistributedRoundPlan(planned.mu, planned.sample_rate, planned.l1, planned.l2, float(scale), int(cohort),
                                    p.max_grad_norm, predicted)

    def _derived_mu(self, server_round: int, release: SkellamRelease) -> float:
        """The variance that spends exactly the budget if this and every remaining round is joined; a budget that
        cannot take even one more round refuses as PrivacyBudgetExceeded (nothing has been released)."""
        remaining = self._remaining_rounds(server_round)
        p = self.cfg.privacy
        spent = self.ledger.epsilon_spent()
        if spent >= self.budget:
            raise PrivacyBudgetExceeded(
                f"site {self.site}: privacy ledger {self.ledger.path} has spent epsilon {spent:.4g}, the site's whole "
                f"budget {self.budget:g}; the site releases nothing this round. To train further, raise max_epsilon "
                "in the site policy or privacy.target_epsilon")
        try:
            return skellam_mu_for(self.budget, p.delta, sample_rate=release.sample_rate, l1=release.l1,
                                  l2=release.l2, steps=remaining, accountant=p.accountant,
                                  history=self.ledger.history())
        except PrivacyError as exc:  # the release is valid (checked), so what fails here is the budget
            raise PrivacyBudgetExceeded(
                f"site {self.site}: no Skellam noise fits {remaining} more round(s) in the budget "
                f"{self.budget:g} (privacy ledger {self.ledger.path}): {exc}; the site releases nothing this round"
            ) from exc

    def commit_distributed(self, server_round: int, plan: DistributedRoundPlan) -> float:
        """Record the round's Skellam release (a schema-version-2 ledger line with mechanism, mu, sensitivities,
        cohort and scale); returns the site's cumulative epsilon after it."""
        p = self.cfg.privacy
        release = check_skellam_release(plan.release(), where="distributed release")
        spent = self.ledger.cumulative_epsilon(release, p.delta, p.accountant)
        self.ledger.commit(LedgerEntry(round=server_round, steps=release.steps, sample_rate=release.sample_rate,
                                       noise_multiplier=release.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                                       epsilon=spent, delta=p.delta, accountant=p.accountant, run=self.cfg.run.name,
                                       mechanism="skellam", mu=release.mu, l1=release.l1, l2=release.l2,
                                       cohort=plan.cohort, scale=plan.scale))
        return spent
