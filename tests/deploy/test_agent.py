"""The site agent's settings and checks: what `fedpeft client` verifies before it starts Flower's SuperNode."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from fedpeft import wire
from fedpeft.deploy.agent import check_site, diagnose, load_site_settings, node_config
from fedpeft.errors import DeployError, PrivacyError
from tests.deploy.federation import site_bundle


@pytest.fixture
def bundle(tmp_path):
    return site_bundle(tmp_path, "127.0.0.1:9092")


def test_bundle_settings_resolve_relative_to_the_file_and_pass_the_checks(bundle):
    site = load_site_settings(bundle / "site.toml")
    assert site.name == "hospital-a" and site.index == 0 and site.local_port == 9094
    assert site.data_path == bundle / "data.csv" and site.node_key == bundle / "node.key"
    assert check_site(site, reach_coordinator=False) == ("127.0.0.1", 9092)


def test_node_config_is_what_flower_parses_into_the_clientapps_node_config(bundle):
    site = load_site_settings(bundle / "site.toml")
    parsed = parse_config_args([node_config(site)])
    assert parsed[wire.NODE_PARTITION_ID] == 0
    assert parsed[wire.NODE_DATA_PATH] == str(bundle / "data.csv")
    assert parsed[wire.NODE_POLICY_FILE] == str(bundle / "policy.toml")
    assert parsed[wire.NODE_LEDGER_PATH] == str(bundle / "privacy_ledger.jsonl")
    assert wire.NODE_BASE_MODEL not in parsed  # empty base_model: the run's model


@pytest.mark.parametrize(("edit", "message"), [
    (('index = 0', 'index = "zero"'), "[site] index = 'zero' must be a int"),
    (('node_key = "node.key"\n', ''), "[site] node_key is missing"),
    (('[site]', '[site]\ncolour = "red"'), "unknown key(s) ['colour']"),
    (('[site]', '[site'), "is not valid TOML"),
])
def test_bad_site_config_names_the_key(bundle, edit, message):
    config = bundle / "site.toml"
    config.write_text(config.read_text().replace(*edit))
    with pytest.raises(DeployError) as info:
        load_site_settings(config)
    assert message in str(info.value) and str(config) in str(info.value)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: (b / "node.key").unlink(), "node.key"),
    (lambda b: (b / "data.csv").unlink(), "data.csv"),
    (lambda b: (b / "ca.pem").write_text("not a certificate"), "ca.pem"),
    (lambda b: (b / "policy.toml").write_text("[policy]\nmax_epsilon = -1\n"), "max_epsilon"),
])
def test_missing_or_broken_site_files_are_named(bundle, damage, message):
    damage(bundle)
    with pytest.raises((DeployError, PrivacyError)) as info:  # the policy file raises its own PrivacyError
        check_site(load_site_settings(bundle / "site.toml"), reach_coordinator=False)
    assert message in str(info.value)


def test_flower_failures_are_explained():
    assert "does not accept this site's node key" in diagnose("[code: 2004] Failed to activate SuperNode.")
    assert "does not verify against root_certificates" in diagnose("[SSL: CERTIFICATE_VERIFY_FAILED] failed")
    assert diagnose("all fine") is None
