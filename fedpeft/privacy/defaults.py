"""DP defaults that work without tuning: the distributed-DP probe's rounds and server learning rate from the
target epsilon and the sites' total training rows.

Why two numbers suffice. With full batches (q = 1) the noise each round needs, over the clip, grows as
sqrt(rounds) for a fixed budget: sigma = s1 * sqrt(T), where s1 depends only on epsilon and delta (4.18 / 1.20 /
0.66 at epsilon 1 / 4 / 8, delta 1e-5; ``noise_per_root_round``). With heavy-ball momentum m = 0.9 the noise left
in each weight after T steps of size lr on the mean gradient of N rows is then about
``lr * sqrt(T) * sigma / (N * (1 - m)) = s1 * M / (N * (1 - m))`` with ``M = lr * T``, the distance the weights
travel: whatever the split into steps, the end noise is set by M. The tuned optima sit where that noise is about
one unit per weight (``NOISE_PER_WEIGHT``), i.e. ``M = N * (1 - m) / s1``: banking77 (N = 9,003; epsilon 1 / 4 / 8:
rule 216 / 753 / 1,368, tuned best 200-400 / 800 / 800-1,600) and medical-abstracts (N = 1,913: rule 46 / 160 /
291, tuned best 50 / 100-200 / 100-200). At a fixed M the split into rounds mattered little (0.01-0.02 either way),
so the step is ``LEARNING_RATE`` and the rounds follow, within [``MIN_ROUNDS``, ``MAX_ROUNDS``]. The constants
were chosen on validation rows carved from the training data -- never on a test set -- by
``benchmarks/tune_private_probe.py`` (benchmarks/RESULTS.md has the grid, the rule's own scores and the command):
2 datasets x 3 budgets, 20 settings each. A site's own data may prefer other values: set ``federation.rounds`` and
``strategy.server_learning_rate`` explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedpeft.config import RunConfig
from fedpeft.errors import ConfigError
from fedpeft.privacy import distributed, skellam

MIN_ROUNDS, MAX_ROUNDS = 25, 400
LEARNING_RATE = 4.0  # server-sgd's step on the mean gradient
MAX_LEARNING_RATE = 16.0  # the largest step the grid found stable with momentum 0.9 (normalised features)
MOMENTUM = 0.9  # server-sgd's default
NOISE_PER_WEIGHT = 1.0  # the end noise per weight the tuned optima sit at
_NOMINAL_DIM, _REFERENCE_ROUNDS = 1024, 100  # s1 barely depends on either (the rounding term is 1/32 of the clip)


@dataclass(frozen=True)
class ProbeSchedule:
    rounds: int
    learning_rate: float  # server-sgd's step on the mean gradient (momentum 0.9)


def noise_per_root_round(*, target_epsilon: float, delta: float) -> float:
    """s1 = sigma / sqrt(T) of the full-batch Skellam release that spends ``target_epsilon`` (the accountant's)."""
    scale = distributed.SCALE_PER_ROOT_DIM * math.sqrt(_NOMINAL_DIM)
    l2 = scale + math.sqrt(_NOMINAL_DIM)
    mu = skellam.mu_for(target_epsilon=target_epsilon, q=1.0, steps=_REFERENCE_ROUNDS, delta=delta, l2=l2,
                        l1=skellam.rounded_l1_bound(l2_bound=l2, dim=_NOMINAL_DIM))
    return math.sqrt(mu) / scale / math.sqrt(_REFERENCE_ROUNDS)


def probe_schedule(*, target_epsilon: float, total_rows: int, delta: float = 1e-5) -> ProbeSchedule:
    """Rounds and server learning rate for a full-batch distributed-DP probe over ``total_rows`` rows."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"privacy.target_epsilon = {target_epsilon!r}: the schedule needs a finite budget > 0")
    if total_rows < 1:
        raise ConfigError(f"the sites' total training rows = {total_rows!r}: the schedule needs at least one row")
    s1 = noise_per_root_round(target_epsilon=target_epsilon, delta=delta)
    movement = NOISE_PER_WEIGHT * total_rows * (1 - MOMENTUM) / s1
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(movement / LEARNING_RATE)))
    return ProbeSchedule(rounds, round(min(MAX_LEARNING_RATE, movement / rounds), 4))


def derive_schedule(cfg: RunConfig, *, total_rows: int) -> RunConfig:
    """``cfg`` with ``federation.rounds = 0`` (derive) filled from the budget and ``total_rows``; the server's
    learning rate too unless it is set. Any other config is returned unchanged."""
    if cfg.federation.rounds:
        return cfg
    if not (cfg.privacy.dp and cfg.privacy.dp_mode == "distributed"):
        raise ConfigError("federation.rounds = 0 derives the rounds of a distributed-DP run; set privacy.dp = true "
                          "and privacy.dp_mode = 'distributed', or give federation.rounds >= 1")
    schedule = probe_schedule(target_epsilon=cfg.privacy.target_epsilon, total_rows=total_rows,
                              delta=cfg.privacy.delta)
    strategy = cfg.strategy
    if not strategy.server_learning_rate:
        strategy = replace(strategy, server_learning_rate=schedule.learning_rate)
    federation = replace(cfg.federation, rounds=schedule.rounds,
                         eval_every=min(cfg.federation.eval_every, schedule.rounds))
    return replace(cfg, federation=federation, strategy=strategy,
                   privacy=replace(cfg.privacy, expected_rows=total_rows))
