"""What leaves a site in its reply metrics: exact, coarsened, or withheld (fedpeft.privacy.release)."""

from __future__ import annotations

import math

import pytest

from fedpeft import wire
from fedpeft.composition import from_mapping
from fedpeft.errors import ConfigError, PrivacyError
from fedpeft.privacy.policy import load_policy
from fedpeft.privacy.release import release_metrics, significant, stricter

REPLY = {wire.EVAL_ACCURACY: 0.8437, wire.EVAL_LOSS: 0.61234, wire.NUM_EXAMPLES: 1237, wire.TRAIN_LOSS: 1.987,
         wire.TRAIN_STEPS: 37, wire.SAMPLE_RATE: 0.0517, wire.EPSILON: 3.14159, wire.PARTITION_ID: 4}


def test_exact_releases_every_value_as_computed():
    assert release_metrics(REPLY, "exact") == REPLY


def test_coarse_rounds_scores_to_a_grid_and_counts_to_two_significant_digits():
    out = release_metrics(REPLY, "coarse")
    assert out[wire.EVAL_ACCURACY] == 0.85 and out[wire.EVAL_LOSS] == 0.61 and out[wire.TRAIN_LOSS] == 2.0
    assert out[wire.NUM_EXAMPLES] == 1200 and isinstance(out[wire.NUM_EXAMPLES], int)
    assert out[wire.TRAIN_STEPS] == 37 and out[wire.SAMPLE_RATE] == 0.052
    # epsilon comes from public parameters and the ledger; the partition index is the site's name: both exact
    assert out[wire.EPSILON] == REPLY[wire.EPSILON] and out[wire.PARTITION_ID] == 4


def test_coarse_never_turns_a_positive_count_into_zero_and_keeps_non_finite_values():
    out = release_metrics({wire.NUM_EXAMPLES: 1, wire.EVAL_ACCURACY: math.nan}, "coarse")
    assert out[wire.NUM_EXAMPLES] == 1 and math.isnan(out[wire.EVAL_ACCURACY])


def test_none_withholds_scores_losses_and_steps_and_coarsens_counts():
    out = release_metrics(REPLY, "none")
    assert not {wire.EVAL_ACCURACY, wire.EVAL_LOSS, wire.TRAIN_LOSS, wire.TRAIN_STEPS} & set(out)
    assert out[wire.NUM_EXAMPLES] == 1200 and out[wire.EPSILON] == REPLY[wire.EPSILON]


def test_the_stricter_choice_wins_and_an_unknown_mode_is_refused():
    assert stricter("exact", "coarse") == "coarse" and stricter("none", "coarse") == "none"
    assert significant(0.0) == 0.0 and significant(123456) == 120000
    with pytest.raises(ValueError, match="exact, coarse, none"):
        release_metrics(REPLY, "rounded")


def test_the_run_config_and_the_site_policy_validate_the_mode(tmp_path):
    assert from_mapping({"privacy": {"site_metrics": "coarse"}}).privacy.site_metrics == "coarse"
    with pytest.raises(ConfigError, match="privacy.site_metrics"):
        from_mapping({"privacy": {"site_metrics": "fuzzy"}})
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[policy]\nmax_epsilon = 8.0\nsite_metrics = "none"\n')
    bad.write_text('[policy]\nmax_epsilon = 8.0\nsite_metrics = "fuzzy"\n')
    assert load_policy(good).site_metrics == "none"
    with pytest.raises(PrivacyError, match="site_metrics"):
        load_policy(bad)
