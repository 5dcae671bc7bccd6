"""DP defaults without tuning: the distributed-DP schedule derived from the budget and the sites' rows."""

from __future__ import annotations

import pytest

from fedpeft.composition import from_mapping, run_config
from fedpeft.errors import ConfigError
from fedpeft.privacy import defaults
from fedpeft.privacy.defaults import derive_schedule, probe_schedule

DISTRIBUTED = {"peft": {"method": "probe"}, "federation": {"rounds": 0, "secure_aggregation": True,
                                                           "aggregation": "server-sgd", "eval_every": 50},
               "privacy": {"dp": True, "dp_mode": "distributed", "target_epsilon": 1.0}}


def test_the_schedule_travels_further_with_more_budget_or_more_rows_and_keeps_a_stable_step():
    small = probe_schedule(target_epsilon=1, total_rows=2_000)
    large = probe_schedule(target_epsilon=8, total_rows=9_000)
    assert small.rounds * small.learning_rate < large.rounds * large.learning_rate
    for schedule in (small, large, probe_schedule(target_epsilon=100, total_rows=10**7)):
        assert defaults.MIN_ROUNDS <= schedule.rounds <= defaults.MAX_ROUNDS
        assert 0 < schedule.learning_rate <= defaults.MAX_LEARNING_RATE
    # the accountant's noise per sqrt(round) at q = 1: what benchmarks/tune_private_probe.py measured (sigma 41.77
    # at 100 rounds, epsilon 1), and it falls as the budget grows
    assert defaults.noise_per_root_round(target_epsilon=1, delta=1e-5) == pytest.approx(4.177, abs=0.01)
    assert defaults.noise_per_root_round(target_epsilon=8, delta=1e-5) < 1.0
    banking = probe_schedule(target_epsilon=4, total_rows=9_000)  # M = lr * T = N (1 - m) / s1, about 753
    assert banking.rounds * banking.learning_rate == pytest.approx(753, rel=0.01)
    assert banking.learning_rate == pytest.approx(defaults.LEARNING_RATE, rel=0.02)


def test_a_config_with_rounds_zero_and_expected_rows_gets_the_derived_rounds_and_learning_rate():
    cfg = from_mapping({**DISTRIBUTED, "privacy": {**DISTRIBUTED["privacy"], "expected_rows": 9000}})
    expected = probe_schedule(target_epsilon=1.0, total_rows=9000)
    assert cfg.federation.rounds == expected.rounds and cfg.strategy.server_learning_rate == expected.learning_rate
    assert cfg.federation.eval_every == min(50, expected.rounds)
    explicit = from_mapping({**DISTRIBUTED, "strategy": {"server_learning_rate": 2.0},
                             "privacy": {**DISTRIBUTED["privacy"], "expected_rows": 9000}})
    assert explicit.strategy.server_learning_rate == 2.0, "a learning rate the user set is kept"


def test_rounds_zero_outside_distributed_dp_or_without_rows_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="federation.rounds"):
        from_mapping({"federation": {"rounds": 0}})
    undecided = from_mapping(DISTRIBUTED)  # a simulation counts the rows; a deployed server cannot
    assert undecided.federation.rounds == 0
    with pytest.raises(ConfigError, match="privacy.expected_rows"):
        run_config(undecided.to_flat())
    with pytest.raises(ConfigError, match="at least one row"):
        derive_schedule(undecided, total_rows=0)
