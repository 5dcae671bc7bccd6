"""Checks that span the parts of a run, and the one way a run's config is built.

``fedpeft.config`` checks types and the value of each key; whether a method, an aggregation rule, an accountant or
a partitioner exists, and whether they fit together (a method's own options, DP-SGD support, a rule that needs
individual updates under secure aggregation, FedProx's local term under DP-SGD, a secure-aggregation neighbour graph
that can be built), needs the registries above ``config``. It is checked here, once per config, before anything
runs. Apps, the CLI and the benchmarks build configs through ``from_mapping`` / ``from_flat`` / ``load_toml`` (or
``run_config`` for Flower's context, parsed once per process).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig, parse_flat, parse_mapping, parse_toml
from fedpeft.config.checks import Rule, check_rules, fail
from fedpeft.data.partition import registered_partitioners
from fedpeft.errors import ConfigError, FederationError, PrivacyError, SecAggError
from fedpeft.methods import build_method, registered_methods
from fedpeft.privacy.accounting import registered_accountants
from fedpeft.privacy.defaults import derive_schedule
from fedpeft.secagg.graph import default_degree, default_threshold, validate
from fedpeft.strategies import registered_rules


def from_mapping(nested: Mapping[str, Any], origin: str = "config") -> RunConfig:
    """A nested mapping (TOML tables) as a RunConfig, every rule checked."""
    return checked(parse_mapping(nested, origin), origin)


def from_flat(flat: Mapping[str, Any], origin: str = "run config") -> RunConfig:
    """Flower's flat run config (``section.key = value``) as a RunConfig, every rule checked."""
    return checked(parse_flat(flat, origin), origin)


def load_toml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A TOML run config file with flat ``section.key`` overrides on top, every rule checked. With
    ``data.partitioner = "column"`` and no ``federation.num_sites`` in the file or the overrides, the number of sites
    is the number of distinct values in the data's partition column."""
    cfg = parse_toml(path, overrides)
    if cfg.data.partitioner == "column" and not _given(path, overrides, "federation", "num_sites"):
        cfg = _sites_from_column(cfg)
    return checked(cfg, str(path))


def _given(path: str | Path, overrides: Mapping[str, Any] | None, section: str, key: str) -> bool:
    import tomllib

    table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get(section, {})
    return key in table or f"{section}.{key}" in (overrides or {})


def _sites_from_column(cfg: RunConfig) -> RunConfig:
    """One site per value of the partition column (when the data file is here: a coordinator may hold none)."""
    from dataclasses import replace

    from fedpeft.data.sites import column_site_names

    sites = len(column_site_names(cfg))
    if not sites:
        return cfg  # the partitioner names the empty column when the run builds its sites
    federation = replace(cfg.federation, num_sites=sites, min_sites=min(cfg.federation.min_sites, sites))
    return replace(cfg, federation=federation)


def run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Flower's ``context.run_config`` as a RunConfig, parsed and checked once per process (a site receives the
    same run config with every message)."""
    return _cached(tuple(sorted(flat.items())))


@functools.lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    cfg = from_flat(dict(items))
    if not cfg.federation.rounds:  # a simulation fills it before the apps start; a deployment must say
        raise ConfigError("run config: federation.rounds = 0 derives the rounds from the sites' total training rows, "
                          "which a deployed server does not know in advance; set privacy.expected_rows (the sites' "
                          "total rows, an estimate is fine) or federation.rounds")
    return cfg


def checked(cfg: RunConfig, origin: str) -> RunConfig:
    """``cfg`` after every cross-part rule; raises ConfigError naming the key, the value and the fix. With
    ``federation.rounds = 0`` and ``privacy.expected_rows`` the schedule is derived here (fedpeft.privacy.defaults).
    """
    if not cfg.federation.rounds and cfg.privacy.expected_rows:
        cfg = derive_schedule(cfg, total_rows=cfg.privacy.expected_rows)
    check_choices(cfg, origin)
    for method in registered_methods().values():
        check_rules(method.option_rules(cfg), origin)
    check_rules(build_method(cfg).rules(cfg), origin)
    check_rules(rule_rules(cfg), origin)
    check_rules(distributed_rules(cfg), origin)
    if cfg.federation.secure_aggregation:
        check_secure(cfg, origin)
    return cfg


def check_choices(cfg: RunConfig, origin: str) -> None:
    """Each registered choice key names a registered class; the choice lists are the registries'."""
    choices = (("peft.method", cfg.peft.method, registered_methods()),
               ("federation.aggregation", cfg.federation.aggregation, registered_rules()),
               ("privacy.accountant", cfg.privacy.accountant, registered_accountants()),
               ("data.partitioner", cfg.data.partitioner, registered_partitioners()))
    for key, value, registry in choices:
        if value not in registry:
            fail(origin, key, value, f"use one of {list(registry)}")


def rule_rules(cfg: RunConfig) -> list[Rule]:
    """The aggregation rule against secure aggregation and DP-SGD."""
    fed, rules = cfg.federation, registered_rules()
    rule = rules[fed.aggregation]
    secure = [name for name, cls in rules.items() if cls.works_on_secure_sum]
    return [
        ("federation.aggregation", fed.aggregation, rule.works_on_secure_sum or not fed.secure_aggregation,
         f"this rule needs individual updates, which secure aggregation never reveals; use one of {secure} or set "
         "federation.secure_aggregation = false"),
        ("federation.aggregation", fed.aggregation, not (rule.client_proximal_term and cfg.privacy.dp),
         "FedProx's proximal term is not per-example, so DP-SGD would drop its gradient: use 'fedavg' with "
         "privacy.dp, or turn privacy.dp off"),
        # Client-level DP noises and accounts the *sum*; a rule over individual updates would discard that noise.
        ("federation.aggregation", fed.aggregation, rule.works_on_secure_sum or cfg.privacy.client_dp == "off",
         f"client-level DP adds its noise to the sum of the updates, which this rule does not use; use one of "
         f"{secure} with privacy.client_dp, or set privacy.client_dp = 'off'"),
        # Per-site ranks zero-pad the ranks a site does not have: a median or trim would count the padding as votes.
        ("federation.aggregation", fed.aggregation, rule.works_on_secure_sum or not cfg.peft.site_ranks.strip(),
         f"per-site LoRA ranks pad missing ranks with zeros, which a coordinate-wise robust rule would count; use "
         f"one of {secure} with peft.site_ranks, or leave peft.site_ranks empty"),
    ]


def distributed_rules(cfg: RunConfig) -> list[Rule]:
    """Distributed DP: one DP step per round whose noise is split among the sites; only a secure sum hides the
    individual (under-noised) shares, and the server's step needs the gradient sums."""
    p, fed = cfg.privacy, cfg.federation
    distributed = p.dp and p.dp_mode == "distributed"
    method = registered_methods()[cfg.peft.method]
    gradients = [name for name, rule in registered_rules().items() if rule.takes_gradients]
    rule = registered_rules()[fed.aggregation]
    return [
        ("federation.secure_aggregation", fed.secure_aggregation, fed.secure_aggregation or not distributed,
         "distributed DP splits the noise among the sites: only a secure sum hides each site's share, which alone "
         "is too little noise; set federation.secure_aggregation = true (or privacy.dp_mode = 'local')"),
        ("peft.method", cfg.peft.method, method.distributed_dp or not distributed,
         f"distributed DP needs each sampled example's gradient from one forward and backward pass, which "
         f"{[n for n, m in registered_methods().items() if m.distributed_dp]} give; use one of them, or "
         "privacy.dp_mode = 'local'"),
        ("federation.aggregation", fed.aggregation, rule.takes_gradients == distributed,
         f"distributed DP sends noisy gradient sums, which {gradients} step on (and only they expect gradients); "
         f"set federation.aggregation = {gradients[0]!r} with privacy.dp and dp_mode = 'distributed', another rule "
         "otherwise"),
        ("privacy.client_dp", p.client_dp, p.client_dp == "off" or not distributed,
         "distributed example-level DP and client-level DP are not combined; set privacy.client_dp = 'off'"),
        # Noise shares: each site adds 1/m of the noise, so only a secure sum, never one site's update, carries it all.
        ("privacy.client_dp", p.client_dp, p.client_dp != "distributed" or fed.secure_aggregation,
         "distributed client-level DP has each site add only a share of the noise, so without secure aggregation "
         "the coordinator sees every site's update under a fraction of the noise its epsilon assumes; set "
         "federation.secure_aggregation = true, or privacy.client_dp = 'central' (the coordinator adds the noise)"),
    ]


TWO_SITES = ("with 2 sites per round, secure aggregation hides nothing between them: each site can derive the other "
             "site's update from the aggregate (the next global adapter minus its own update)")


def sites_per_round(cfg: RunConfig) -> int:
    fed = cfg.federation
    return max(fed.min_sites, round(fed.fraction_train * fed.num_sites))


def run_warnings(cfg: RunConfig) -> list[str]:
    """What a run accepted knowingly but its operators should still read, once, where it starts."""
    found = []
    if cfg.federation.secure_aggregation and cfg.secagg.accept_two_sites and sites_per_round(cfg) == 2:
        found.append(f"{TWO_SITES} (secagg.accept_two_sites = true)")
    return found


def site_policy_refusals(cfg: RunConfig) -> dict[str, str]:
    """Every simulated site's own policy (``privacy.policy_file``) read and checked against the run, before anything
    trains: a missing or malformed file raises PrivacyError naming it; a run that fewer than
    ``federation.min_sites`` sites' policies allow (so no round could ever aggregate) raises FederationError with
    each site's rule. Returns the sites whose policy refuses the run (site -> reason); the others train."""
    if not cfg.privacy.policy_file:
        return {}
    from fedpeft.privacy.policy import PrivacyRequest, check_request
    from fedpeft.privacy.site_budget import site_policy

    request, refusals = PrivacyRequest.from_config(cfg), {}
    for site in map(str, range(cfg.federation.num_sites)):
        policy = site_policy(cfg, site)
        try:
            if policy is not None:
                check_request(policy, request)
        except PrivacyError as err:
            reason = (err.public or str(err)).removesuffix("; the site trains nothing this round")
            refusals[site] = f"{reason} ({policy.source if policy else 'no policy file'})"
    willing = cfg.federation.num_sites - len(refusals)
    if willing < cfg.federation.min_sites:
        reasons = "; ".join(f"site {site}: {reason}" for site, reason in refusals.items())
        raise FederationError(
            f"no round of this run could train: {len(refusals)} of {cfg.federation.num_sites} sites' own policies "
            f"refuse it (federation.min_sites = {cfg.federation.min_sites}): {reasons}. Change the run config to "
            "what the sites allow, or the sites' policy files")
    return refusals


def check_secure(cfg: RunConfig, origin: str) -> None:
    """The neighbour graph and threshold must be buildable for the sites a round samples."""
    fed = cfg.federation
    sampled = sites_per_round(cfg)
    if sampled < 2:
        fail(origin, "federation.num_sites", fed.num_sites, "secure aggregation needs at least 2 sites per round")
    if sampled == 2 and not cfg.secagg.accept_two_sites:
        fail(origin, "federation.num_sites", fed.num_sites, TWO_SITES + "; use 3 or more sites per round "
             "(federation.num_sites, fraction_train, min_sites), or set secagg.accept_two_sites = true to run it "
             "knowingly")
    degree = min(cfg.secagg.degree or default_degree(sampled), sampled - 1)
    threshold = cfg.secagg.threshold or default_threshold(degree)
    try:
        validate(sampled, degree, threshold)
    except SecAggError as err:
        raise ConfigError(f"{origin}: [secagg] for {sampled} sites per round: {err}") from None
