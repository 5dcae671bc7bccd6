from __future__ import annotations

import dataclasses
import math

import pytest

from fedpeft.errors import PolicyViolation, PrivacyError
from fedpeft.privacy.policy import PrivacyRequest, SitePolicy, check_request, load_policy

VALID = """
[policy]
max_epsilon = 8.0
delta = 1e-6
require_dp = true
min_noise_multiplier = 0.8
max_grad_norm = 1.0
allowed_peft_methods = ["lora"]
client_dp_requires_secure_aggregation = true
"""

COMPLIANT = PrivacyRequest(
    dp=True, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-6, peft_method="lora", client_dp="central",
    secure_aggregation=True,
)


def _write(tmp_path, text):
    path = tmp_path / "site-policy.toml"
    path.write_text(text)
    return path


def test_load_valid_policy(tmp_path):
    path = _write(tmp_path, VALID)
    assert load_policy(path) == SitePolicy(
        max_epsilon=8.0, delta=1e-6, require_dp=True, min_noise_multiplier=0.8, max_grad_norm=1.0,
        allowed_peft_methods=("lora",), client_dp_requires_secure_aggregation=True, source=str(path),
    )


def test_minimal_policy_takes_the_defaults(tmp_path):
    policy = load_policy(_write(tmp_path, "[policy]\nmax_epsilon = 3\n"))
    assert policy.max_epsilon == 3.0 and isinstance(policy.max_epsilon, float)
    assert policy.delta == 1e-5 and policy.require_dp and policy.max_grad_norm == math.inf
    assert policy.allowed_peft_methods == ("lora",)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("[policy]\nmax_epsilon = 8\nmax_epsilom = 1\n", "max_epsilom"),
        ('[policy]\nmax_epsilon = "8"\n', "max_epsilon = '8'"),
        ("[policy]\nmax_epsilon = 8\nrequire_dp = 1\n", "require_dp = 1"),
        ("[policy]\nmax_epsilon = 0\n", "max_epsilon = 0.0"),
        ("[policy]\nmax_epsilon = -1.5\n", "max_epsilon = -1.5"),
        ("[policy]\nmax_epsilon = inf\n", "max_epsilon = inf"),
        ("[policy]\nmax_epsilon = 8\ndelta = 1.5\n", "delta = 1.5"),
        ("[policy]\nmax_epsilon = 8\ndelta = 0\n", "delta = 0.0"),
        ("[policy]\nmax_epsilon = 8\nmin_noise_multiplier = -0.1\n", "min_noise_multiplier = -0.1"),
        ("[policy]\nmax_epsilon = 8\nmax_grad_norm = 0\n", "max_grad_norm = 0.0"),
        ("[policy]\nmax_epsilon = 8\nallowed_peft_methods = []\n", "allowed_peft_methods = ()"),
        ('[policy]\nmax_epsilon = 8\nallowed_peft_methods = "lora"\n', "allowed_peft_methods = 'lora'"),
        ("[policy]\nmax_epsilon = 8\nsource = 'x'\n", "'source'"),
        ("[policy]\ndelta = 1e-5\n", "max_epsilon is missing"),
        ("max_epsilon = 8\n", "unknown top-level key(s) ['max_epsilon']"),
        ("[polcy]\nmax_epsilon = 8\n", "['polcy']"),
        ("", "no [policy] table"),
        ("[policy\nmax_epsilon = 8\n", "cannot be read as TOML"),
    ],
)
def test_bad_policy_file_names_file_key_and_value(tmp_path, text, shown):
    path = _write(tmp_path, text)
    with pytest.raises(PrivacyError) as info:
        load_policy(path)
    assert type(info.value) is PrivacyError
    assert str(path) in str(info.value) and shown in str(info.value)


def test_missing_policy_file_names_path_and_config_key(tmp_path):
    with pytest.raises(PrivacyError, match=r"nope\.toml does not exist.*'privacy\.policy_file'"):
        load_policy(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("changes", "rule", "shown"),
    [
        ({"dp": False}, "require_dp", "without DP-SGD"),
        ({"noise_multiplier": 0.5}, "min_noise_multiplier", "noise_multiplier=0.5, the site allows at least 0.8"),
        ({"max_grad_norm": 5.0}, "max_grad_norm", "max_grad_norm=5, the site allows at most 1"),
        ({"delta": 1e-5}, "delta", "delta=1e-05, the site allows at most 1e-06"),
        ({"peft_method": "ia3"}, "allowed_peft_methods", "peft method 'ia3', the site allows only lora"),
        ({"secure_aggregation": False}, "client_dp_requires_secure_aggregation", "'central' without secure"),
        ({"client_dp": "distributed", "secure_aggregation": False}, "client_dp_requires_secure_aggregation", ""),
    ],
)
def test_each_rule_refuses_a_violating_request(tmp_path, changes, rule, shown):
    path = _write(tmp_path, VALID)
    policy = load_policy(path)
    with pytest.raises(PolicyViolation) as info:
        check_request(policy, dataclasses.replace(COMPLIANT, **changes))
    message = str(info.value)
    assert message.startswith(f"site policy {path} rule '{rule}': the run asks ")
    assert shown in message and message.endswith("; the site trains nothing this round")


def test_compliant_requests_pass(tmp_path):
    policy = load_policy(_write(tmp_path, VALID))
    check_request(policy, COMPLIANT)
    check_request(policy, dataclasses.replace(COMPLIANT, client_dp="off", secure_aggregation=False))
    lenient = SitePolicy(max_epsilon=8.0, require_dp=False)
    check_request(lenient, dataclasses.replace(COMPLIANT, dp=False, noise_multiplier=0.0, max_grad_norm=0.0))


def test_a_derived_noise_multiplier_is_not_refused_the_site_applies_its_minimum():
    policy = SitePolicy(max_epsilon=8.0, min_noise_multiplier=0.5)
    check_request(policy, dataclasses.replace(COMPLIANT, noise_multiplier=0.0))  # 0: derived from the budget


def test_without_dp_the_noise_rules_still_apply():
    policy = SitePolicy(max_epsilon=8.0, require_dp=False, min_noise_multiplier=0.5)
    request = dataclasses.replace(COMPLIANT, dp=False, noise_multiplier=1.0)
    with pytest.raises(PolicyViolation, match=r"rule 'min_noise_multiplier': the run asks noise_multiplier=0,"):
        check_request(policy, request)


def test_first_violated_rule_is_reported():
    policy = SitePolicy(max_epsilon=8.0, min_noise_multiplier=1.0, allowed_peft_methods=("lora",))
    request = dataclasses.replace(COMPLIANT, noise_multiplier=0.1, peft_method="ia3")
    with pytest.raises(PolicyViolation, match="site policy \\(not read from a file\\) rule 'min_noise_multiplier'"):
        check_request(policy, request)


def test_unknown_client_dp_mode_is_an_error():
    with pytest.raises(PrivacyError, match="client_dp='local' is unknown"):
        check_request(SitePolicy(max_epsilon=1.0), dataclasses.replace(COMPLIANT, client_dp="local"))
