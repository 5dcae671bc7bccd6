"""A refusal is a typed value (rule + reason) on the wire, and what leaves a site names no file of the site."""

from __future__ import annotations

from dataclasses import replace

import pytest
from flwr.app import RecordDict

from fedpeft.errors import PrivacyBudgetExceeded, PrivacyError
from fedpeft.messaging import Refusal, without_paths
from fedpeft.privacy.policy import check_request, load_policy
from tests.privacy.test_policy import COMPLIANT, VALID


def test_a_policy_refusal_travels_with_its_rule_and_no_path(tmp_path):
    policy_file = tmp_path / "hospital-a" / "policy.toml"
    policy_file.parent.mkdir()
    policy_file.write_text(VALID)
    with pytest.raises(PrivacyError) as info:
        check_request(load_policy(policy_file), replace(COMPLIANT, dp=False))
    assert str(policy_file) in str(info.value), "the site's own message names its file"
    refusal = Refusal.of(info.value)
    assert refusal.rule == "require_dp"
    assert str(tmp_path) not in refusal.reason and "require_dp" in refusal.reason
    assert Refusal.in_content(refusal.content(partition_id=3)) == refusal


def test_refusal_rules_default_by_kind_and_paths_are_scrubbed_from_any_message():
    budget = Refusal.of(PrivacyBudgetExceeded("site 0 would spend epsilon 9 > 8 (ledger /srv/site/ledger.jsonl)"))
    assert budget.rule == "privacy_budget" and "/srv" not in budget.reason and "epsilon 9 > 8" in budget.reason
    assert without_paths("policy C:\\sites\\a\\p.toml and ~/x/y.toml, ratio 1/2") == \
        "policy <site file> and <site file>, ratio 1/2"


def test_a_reply_without_a_refusal_is_not_one():
    assert Refusal.in_content(RecordDict({})) is None
