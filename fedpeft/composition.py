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
from fedpeft.errors import ConfigError, SecAggError
from fedpeft.methods import build_method, registered_methods
from fedpeft.privacy.accounting import registered_accountants
from fedpeft.secagg.graph import default_degree, default_threshold, validate
from fedpeft.strategies import registered_rules


def from_mapping(nested: Mapping[str, Any], origin: str = "config") -> RunConfig:
    """A nested mapping (TOML tables) as a RunConfig, every rule checked."""
    return checked(parse_mapping(nested, origin), origin)


def from_flat(flat: Mapping[str, Any], origin: str = "run config") -> RunConfig:
    """Flower's flat run config (``section.key = value``) as a RunConfig, every rule checked."""
    return checked(parse_flat(flat, origin), origin)


def load_toml(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A TOML run config file with flat ``section.key`` overrides on top, every rule checked."""
    return checked(parse_toml(path, overrides), str(path))


def run_config(flat: Mapping[str, Any]) -> RunConfig:
    """Flower's ``context.run_config`` as a RunConfig, parsed and checked once per process (a site receives the
    same run config with every message)."""
    return _cached(tuple(sorted(flat.items())))


@functools.lru_cache(maxsize=8)
def _cached(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return from_flat(dict(items))


def checked(cfg: RunConfig, origin: str) -> RunConfig:
    """``cfg`` after every cross-part rule; raises ConfigError naming the key, the value and the fix."""
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
         f"distributed DP needs per-example gradients in closed form, which "
         f"{[n for n, m in registered_methods().items() if m.distributed_dp]} give; use one of them, or "
         "privacy.dp_mode = 'local'"),
        ("federation.aggregation", fed.aggregation, rule.takes_gradients == distributed,
         f"distributed DP sends noisy gradient sums, which {gradients} step on (and only they expect gradients); "
         f"set federation.aggregation = {gradients[0]!r} with privacy.dp and dp_mode = 'distributed', another rule "
         "otherwise"),
        ("privacy.client_dp", p.client_dp, p.client_dp == "off" or not distributed,
         "distributed example-level DP and client-level DP are not combined; set privacy.client_dp = 'off'"),
    ]


def check_secure(cfg: RunConfig, origin: str) -> None:
    """The neighbour graph and threshold must be buildable for the sites a round samples."""
    fed = cfg.federation
    sampled = max(fed.min_sites, round(fed.fraction_train * fed.num_sites))
    if sampled < 2:
        fail(origin, "federation.num_sites", fed.num_sites, "secure aggregation needs at least 2 sites per round")
    degree = min(cfg.secagg.degree or default_degree(sampled), sampled - 1)
    threshold = cfg.secagg.threshold or default_threshold(degree)
    try:
        validate(sampled, degree, threshold)
    except SecAggError as err:
        raise ConfigError(f"{origin}: [secagg] for {sampled} sites per round: {err}") from None
