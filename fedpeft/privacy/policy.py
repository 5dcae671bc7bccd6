"""A site's own privacy policy file. It beats the server's run config: a request it forbids is refused.

The file is TOML with one ``[policy]`` table, e.g.::

    [policy]
    max_epsilon = 8.0            # the site's total budget over all rounds it joins (required)
    delta = 1e-5
    require_dp = true
    min_noise_multiplier = 0.8
    max_grad_norm = 1.0
    allowed_peft_methods = ["lora"]
    client_dp_requires_secure_aggregation = true
    accept_distributed_noise = true  # distributed DP: add a 1/m share of the noise (false: the whole noise)
    min_cohort = 3                   # distributed DP: reveal unmasking shares only when >= 3 sites are in a sum
    site_metrics = "coarse"          # how held-out scores, losses and counts leave: exact | coarse | none
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.config.types import SITE_METRICS
from fedpeft.errors import PolicyViolation, PrivacyError

if TYPE_CHECKING:
    from fedpeft.config import RunConfig

POLICY_FILE_KEY = "privacy.policy_file"
POLICY_OPTIONAL_KEY = "privacy.policy_optional"
POLICY_FILE_RULE = "policy_file"  # the rule a refusal names when the site's own policy file is missing or broken
CLIENT_DP_MODES = ("off", "central", "distributed")


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float  # the site's total budget over all rounds it joins
    delta: float = 1e-5
    require_dp: bool = True  # refuse runs without example-level DP-SGD
    min_noise_multiplier: float = 0.0
    max_grad_norm: float = math.inf  # the largest per-example clipping norm the site accepts
    allowed_peft_methods: tuple[str, ...] = ("lora",)
    client_dp_requires_secure_aggregation: bool = False
    # Distributed DP: whether the site trusts that the other sites' noise shares are in the sum with its own (if not,
    # it adds the whole noise itself), and the fewest sites it accepts in a decoded sum.
    accept_distributed_noise: bool = True
    min_cohort: int = 0
    site_metrics: str = "exact"  # fedpeft.privacy.release: the stricter of this and the run's privacy.site_metrics
    source: str = ""  # the file it was read from, for messages


@dataclass(frozen=True)
class PrivacyRequest:
    """What the server's run config asks the site to do this round."""

    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    peft_method: str
    client_dp: str  # "off" | "central" | "distributed"
    secure_aggregation: bool

    @classmethod
    def from_config(cls, cfg: RunConfig) -> PrivacyRequest:
        """What a run config asks of every site."""
        p = cfg.privacy
        return cls(dp=p.dp, noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm, delta=p.delta,
                   peft_method=cfg.peft.method, client_dp=p.client_dp,
                   secure_aggregation=cfg.federation.secure_aggregation)


_BOOL_KEYS = ("require_dp", "client_dp_requires_secure_aggregation", "accept_distributed_noise")
_FLOAT_KEYS = ("max_epsilon", "delta", "min_noise_multiplier", "max_grad_norm")
_INT_KEYS = ("min_cohort",)
_KEYS = _FLOAT_KEYS + _BOOL_KEYS + _INT_KEYS + ("allowed_peft_methods", "site_metrics")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _policy_error(path: Path, problem: str) -> PrivacyError:
    """A broken policy file: the site's own message names the file; what may leave the site (``public``) names only
    the problem, never the site's path (``fedpeft.messaging.Refusal``)."""
    return PrivacyError(f"site policy {path}{problem}", rule=POLICY_FILE_RULE,
                        public=f"site policy file{problem}; the site trains nothing until its operators fix it")


def _bad(path: Path, key: str, value: Any, fix: str) -> PrivacyError:
    return _policy_error(path, f": [policy] {key} = {value!r} is invalid; {fix}")


def missing_policy(path: Path, *, templated: bool = False) -> PrivacyError:
    """The error for a policy file that does not exist (a typo must never turn a site's policy off)."""
    per_site = (f" (from '{POLICY_FILE_KEY}' with '{{site}}' replaced by the site's id)" if templated else "")
    return PrivacyError(
        f"site policy file {path}{per_site} does not exist; create it, fix the path in '{POLICY_FILE_KEY}' (or the "
        f"site's policy_file), or set {POLICY_OPTIONAL_KEY} = true if sites without a policy file may train under "
        "the run config alone", rule=POLICY_FILE_RULE,
        public="the site's policy file does not exist; the site trains nothing until its operators fix the path")


def _read_table(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise missing_policy(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:  # its strerror only: the exception's own text repeats the path
        raise _policy_error(path, f" cannot be read ({exc.strerror}); check its permissions") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _policy_error(path, f" cannot be read as TOML ({exc}); fix the file") from None
    extra = sorted(set(document) - {"policy"})
    if extra:
        raise _policy_error(path, f": unknown top-level key(s) {extra}; put every setting in [policy]")
    table = document.get("policy")
    if not isinstance(table, dict):
        raise _policy_error(path, " has no [policy] table; add one with at least max_epsilon = <budget>")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise _policy_error(path, f": unknown key(s) {unknown} in [policy]; the known keys are {', '.join(_KEYS)}")
    if "max_epsilon" not in table:
        raise _policy_error(path, ": [policy] max_epsilon is missing; set the site's total budget")
    return table


def _check_types(path: Path, table: dict[str, Any]) -> None:
    for key, value in table.items():
        if key in _FLOAT_KEYS and not _is_number(value):
            raise _bad(path, key, value, "it must be a number")
        if key in _BOOL_KEYS and not isinstance(value, bool):
            raise _bad(path, key, value, "it must be true or false")
        if key in _INT_KEYS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise _bad(path, key, value, "it must be a whole number >= 0 (0: the run's cohort)")
        if key == "site_metrics" and value not in SITE_METRICS:
            raise _bad(path, key, value, f"use one of {list(SITE_METRICS)}")
        if key == "allowed_peft_methods" and (
            not isinstance(value, list) or not all(isinstance(m, str) and m for m in value)
        ):
            raise _bad(path, key, value, 'it must be a list of method names, e.g. ["lora"]')


def _check_values(path: Path, policy: SitePolicy) -> None:
    checks = (
        (0 < policy.max_epsilon < math.inf, "max_epsilon", "set a finite budget > 0, e.g. 8.0"),
        (0 < policy.delta < 1, "delta", "it must be strictly between 0 and 1, e.g. 1e-5"),
        (0 <= policy.min_noise_multiplier < math.inf, "min_noise_multiplier", "it must be a finite number >= 0"),
        (policy.max_grad_norm > 0, "max_grad_norm", "it must be > 0 (inf accepts any clipping norm)"),
        (len(policy.allowed_peft_methods) > 0, "allowed_peft_methods", 'list at least one method, e.g. ["lora"]'),
    )
    for ok, key, fix in checks:
        if not ok:
            raise _bad(path, key, getattr(policy, key), fix)


def load_policy(path: str | Path) -> SitePolicy:
    """Read and validate the site's policy file."""
    path = Path(path)
    table = _read_table(path)
    _check_types(path, table)
    values: dict[str, Any] = {key: float(table[key]) for key in _FLOAT_KEYS if key in table}
    values.update({key: table[key] for key in _BOOL_KEYS + _INT_KEYS if key in table})
    if "allowed_peft_methods" in table:
        values["allowed_peft_methods"] = tuple(table["allowed_peft_methods"])
    if "site_metrics" in table:
        values["site_metrics"] = table["site_metrics"]
    policy = SitePolicy(**values, source=str(path))
    _check_values(path, policy)
    return policy


def _violation(policy: SitePolicy, rule: str, asks: str, allows: str) -> PolicyViolation:
    source = policy.source or "(not read from a file)"
    public = (f"site policy rule '{rule}': the run asks {asks}, the site allows {allows}; "
              "the site trains nothing this round")
    return PolicyViolation(public.replace("site policy", f"site policy {source}", 1), rule=rule, public=public)


def _first_violation(policy: SitePolicy, request: PrivacyRequest) -> PolicyViolation | None:
    # Without DP-SGD there is no noise and no clipping: the effective noise multiplier is 0, the norm unbounded.
    noise = request.noise_multiplier if request.dp else 0.0
    clip = request.max_grad_norm if request.dp else math.inf
    if policy.require_dp and not request.dp:
        return _violation(policy, "require_dp", "training without DP-SGD", "only training with DP-SGD")
    # noise_multiplier 0 with DP means "derive it from the budget": the site derives it and raises it to the policy's
    # minimum itself (SiteBudget.plan), so there is nothing to refuse. Comparisons fail closed on a NaN request.
    derived = request.dp and request.noise_multiplier == 0
    if not derived and not noise >= policy.min_noise_multiplier:
        return _violation(
            policy, "min_noise_multiplier", f"noise_multiplier={noise:g}", f"at least {policy.min_noise_multiplier:g}"
        )
    if not clip <= policy.max_grad_norm:
        return _violation(policy, "max_grad_norm", f"max_grad_norm={clip:g}", f"at most {policy.max_grad_norm:g}")
    if request.dp and not request.delta <= policy.delta:
        return _violation(policy, "delta", f"delta={request.delta:g}", f"at most {policy.delta:g}")
    if request.peft_method not in policy.allowed_peft_methods:
        allowed = ", ".join(policy.allowed_peft_methods)
        return _violation(policy, "allowed_peft_methods", f"peft method {request.peft_method!r}", f"only {allowed}")
    if policy.client_dp_requires_secure_aggregation and request.client_dp != "off" and not request.secure_aggregation:
        return _violation(
            policy,
            "client_dp_requires_secure_aggregation",
            f"client-level DP '{request.client_dp}' without secure aggregation",
            "client-level DP only with secure aggregation",
        )
    return None


def check_request(policy: SitePolicy, request: PrivacyRequest) -> None:
    """Raise PolicyViolation for the first rule of ``policy`` that ``request`` breaks."""
    if request.client_dp not in CLIENT_DP_MODES:
        raise PrivacyError(
            f"privacy request: client_dp={request.client_dp!r} is unknown; use one of {', '.join(CLIENT_DP_MODES)}"
        )
    violation = _first_violation(policy, request)
    if violation is not None:
        raise violation
