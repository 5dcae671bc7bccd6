"""A site's privacy gate for one round: its policy is checked, its budget is checked before training, and the
release is committed to its ledger after training. Everything it knows is on disk, so a restart changes nothing.

Two kinds of round: local DP-SGD (``plan`` / ``commit``: Gaussian releases) and distributed DP (``plan_distributed``
/ ``commit_distributed``: one Poisson-subsampled Skellam release per round, its noise shared among the cohort under
secure aggregation). Both go to the same ledger and the same budget; a history holding a Skellam release is
accounted by RDP whatever ``privacy.accountant`` says (``accounting.history_epsilon``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.errors import PrivacyBudgetExceeded, PrivacyError
from fedpeft.privacy.accounting import SkellamRelease, check_skellam_release, noise_multiplier_for, skellam_mu_for
from fedpeft.privacy.ledger import LedgerEntry, PrivacyLedger
from fedpeft.privacy.policy import PrivacyRequest, SitePolicy, check_request, load_policy

LEDGER_FILE = "privacy_ledger.jsonl"
SITE_PLACEHOLDER = "{site}"


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
    root = Path(cfg.privacy.ledger_dir) if cfg.privacy.ledger_dir else Path(cfg.run.out_dir) / cfg.run.name / "sites"
    return root.expanduser() / f"site-{site}" / LEDGER_FILE


def site_policy(cfg: RunConfig, site: str, override: str | None = None) -> SitePolicy | None:
    """The site's own policy: a node-local path (deployment) or ``privacy.policy_file``.

    In simulations ``privacy.policy_file`` may contain ``{site}`` to give each simulated site its own file; a site
    whose file does not exist then runs under the run config alone (as a real site without a policy would).
    """
    path = override or cfg.privacy.policy_file
    if not path:
        return None
    if SITE_PLACEHOLDER in path:
        path = path.replace(SITE_PLACEHOLDER, site)
        if not Path(path).expanduser().is_file():
            return None
    return load_policy(Path(path).expanduser())


class SiteBudget:
    """Policy + ledger of one site, for one round at a time."""

    def __init__(self, cfg: RunConfig, site: str, policy: SitePolicy | None, ledger_path: Path) -> None:
        self.cfg, self.site, self.policy = cfg, site, policy
        self.ledger = PrivacyLedger(ledger_path)

    @property
    def budget(self) -> float:
        """The run's target, lowered by the site's own policy where that is stricter."""
        target = self.cfg.privacy.target_epsilon
        return min(target, self.policy.max_epsilon) if self.policy else target

    def request(self) -> PrivacyRequest:
        p = self.cfg.privacy
        return PrivacyRequest(dp=p.dp, noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
                              delta=p.delta, peft_method=self.cfg.peft.method, client_dp=p.client_dp,
                              secure_aggregation=self.cfg.federation.secure_aggregation)

    def check_policy(self) -> None:
        """Raise PolicyViolation naming the rule if the run config asks what the site's policy forbids."""
        if self.policy is not None:
            check_request(self.policy, self.request())

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
