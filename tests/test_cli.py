"""`fedpeft simulate` is private by default; a non-private run is one flag away."""

from __future__ import annotations

from fedpeft.cli import build_parser, simulate_config


def _config(*argv: str):
    return simulate_config(build_parser().parse_args(["simulate", *argv]))


def test_simulate_with_no_options_runs_distributed_dp_at_epsilon_8_with_secure_aggregation():
    cfg = _config()
    assert cfg.privacy.dp and cfg.privacy.dp_mode == "distributed" and cfg.privacy.target_epsilon == 8.0
    assert cfg.federation.secure_aggregation and cfg.federation.aggregation == "server-sgd"


def test_no_privacy_is_one_flag_away_and_overrides_still_apply():
    plain = _config("--no-privacy")
    assert not plain.privacy.dp and not plain.federation.secure_aggregation and plain.peft.method == "lora"
    assert _config("--set", "privacy.target_epsilon=4").privacy.target_epsilon == 4.0
