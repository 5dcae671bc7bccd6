"""A site's privacy gate for one round: its policy is checked, its budget is checked before training, and the
release is committed to its ledger after training. Everything it knows is on disk, so a restart changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import RunConfig
from fedpeft.errors import PrivacyError
from fedpeft.privacy.accounting import epsilon, noise_multiplier_for
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

    def plan(self, server_round: int, sample_rate: float, steps: int) -> RoundPlan:
        """Raise PolicyViolation / PrivacyBudgetExceeded / PrivacyError before any training happens."""
        self.check_policy()
        if self.ledger.released(self.cfg.run.name, server_round):
            raise PrivacyError(
                f"site {self.site}: round {server_round} of run {self.cfg.run.name!r} is already in the privacy ledger "
                f"{self.ledger.path} (the coordinator restarted mid-round?); training it again would be a second "
                "release of the same round, so the site sits this round out and trains the next one")
        p = self.cfg.privacy
        sigma = p.noise_multiplier or self._derived_noise(server_round, sample_rate, steps)
        if self.policy is not None:
            sigma = max(sigma, self.policy.min_noise_multiplier)  # more noise than asked is always allowed
        predicted = self.ledger.check((sigma, sample_rate, steps), p.delta, self.budget, p.accountant)
        return RoundPlan(sigma, sample_rate, steps, p.max_grad_norm, predicted)

    def _derived_noise(self, server_round: int, sample_rate: float, steps: int) -> float:
        """The noise that spends exactly the budget if this and every remaining round of the run is joined."""
        remaining = max(self.cfg.federation.rounds - server_round + 1, 1)
        return noise_multiplier_for(self.budget, self.cfg.privacy.delta, sample_rate, steps * remaining,
                                    accountant=self.cfg.privacy.accountant, history=self.ledger.history())

    def commit(self, server_round: int, plan: RoundPlan, steps_taken: int) -> float:
        """Record the release that happened; returns the site's cumulative epsilon after it."""
        release = (plan.noise_multiplier, plan.sample_rate, steps_taken)
        spent = epsilon([*self.ledger.history(), release], self.cfg.privacy.delta, self.cfg.privacy.accountant)
        self.ledger.commit(LedgerEntry(round=server_round, steps=steps_taken, sample_rate=plan.sample_rate,
                                       noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                                       epsilon=spent, delta=self.cfg.privacy.delta,
                                       accountant=self.cfg.privacy.accountant, run=self.cfg.run.name))
        return spent
