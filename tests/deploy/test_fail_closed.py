"""A site agent and the PKI fail closed, and say so (issue #18 §4): a SuperNode that dies is noticed and reported
with its last log lines, key files are checked for their mode and content, addresses and host names are validated,
and a site's refusal names rules and values, never the site's files."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import replace

import pytest

from fedpeft.cli import main as cli_main
from fedpeft.composition import from_mapping
from fedpeft.deploy import agent
from fedpeft.deploy.agent import check_site, load_site_settings
from fedpeft.deploy.pki import init_pki
from fedpeft.deploy.preflight import check_audit_key, check_server_certificate
from fedpeft.deploy.processes import runtime_env
from fedpeft.errors import DeployError, PrivacyError
from fedpeft.messaging import Refusal
from fedpeft.privacy.policy import PrivacyRequest, check_request
from fedpeft.privacy.site_budget import site_policy
from tests.deploy.federation import site_bundle


@pytest.fixture
def bundle(tmp_path):
    return site_bundle(tmp_path, "127.0.0.1:9")


# ---- 4: a SuperNode that died is noticed (a real flower-supernode process) ----------------------------------------

def test_an_agent_whose_supernode_dies_exits_with_its_last_log_lines(bundle, tmp_path, monkeypatch):
    """The documented systemd unit's failure: `flower-superexec` not on the SuperNode's PATH. The SuperNode's main
    thread dies but its process lingers; the agent must not wait on it for ever."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    site = load_site_settings(bundle / "site.toml")
    with pytest.raises(DeployError, match=r"`flower-superexec` command is not on the PATH"):
        agent.check_flower_commands({**os.environ, "PATH": str(empty)})  # caught before the SuperNode starts
    # Past that check (e.g. the command vanished after it), the SuperNode itself dies: the agent notices.
    monkeypatch.setattr(agent, "runtime_env", lambda home, extra=None: {**runtime_env(home), "PATH": str(empty)})
    monkeypatch.setattr(agent, "check_flower_commands", lambda env: None)
    monkeypatch.setattr(agent, "wait_for_coordinator", lambda *args: None)
    monkeypatch.setattr(agent, "_run_supernode", functools.partial(agent._run_supernode, grace=1.0))
    started = time.monotonic()
    with pytest.raises(DeployError) as info:
        agent.run_agent(site, echo=lambda line: None)
    message = str(info.value)
    assert time.monotonic() - started < 90, "the agent must not hang on a dead SuperNode"
    assert "the agent stopped: flower-supernode failed" in message
    assert "FileNotFoundError" in message and "flower-superexec" in message, message
    assert str(site.state_dir / "agent.log") in message


# ---- 8: key files: mode and content ---------------------------------------------------------------------------

def test_check_refuses_an_audit_key_readable_by_others_missing_or_not_a_key(bundle):
    site = load_site_settings(bundle / "site.toml")
    key = bundle / "audit.key"
    key.chmod(0o644)
    with pytest.raises(DeployError, match=r"audit_key .*'.*audit\.key' has mode 0644.*chmod 600"):
        check_site(site, reach_coordinator=False)
    key.chmod(0o600)
    check_site(site, reach_coordinator=False)
    key.write_bytes(os.urandom(64))
    with pytest.raises(DeployError, match=r"audit\.key' is not an Ed25519 private key"):
        check_site(site, reach_coordinator=False)
    key.unlink()
    with pytest.raises(DeployError, match=r"audit\.key' does not exist; restore the site's audit\.key"):
        check_site(site, reach_coordinator=False)


def test_the_coordinators_private_keys_must_be_0600_and_its_audit_key_valid(tmp_path):
    pki = init_pki(tmp_path / "pki", ["127.0.0.1"])
    (pki / "server.key").chmod(0o640)
    with pytest.raises(DeployError, match=r"coordinator private key '.*server\.key' has mode 0640"):
        check_server_certificate(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    assert check_audit_key(pki / "audit.key", "audit key", "fix") == (pki / "audit.pub").read_text().strip()
    (pki / "audit.key").chmod(0o604)
    with pytest.raises(DeployError, match=r"audit key '.*audit\.key' has mode 0604"):
        check_audit_key(pki / "audit.key", "audit key", "fix")


# ---- 9: host names and addresses --------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "fragment"), [
    (["init", "--host", "bad host!"], "--host 'bad host!' holds ' ', '!'"),
    (["init", "--host", "10.0.0.300"], "--host '10.0.0.300' is not a valid IP address"),
    (["init", "--host=-lead.example.org"], "has the part '-lead'"),
    (["init", "--host", "a.example", "--host", "a.example"], "given more than once"),
    (["add-site", "a", "--coordinator", "notaport"], "--coordinator 'notaport' has no port"),
    (["add-site", "a", "--coordinator", "bad!:9092"], "invalid host 'bad!'"),
    (["add-site", "a", "--coordinator", "host:99999"], "port 99999, outside 1-65535"),
])
def test_pki_refuses_bad_hosts_and_addresses(tmp_path, capsys, argv, fragment):
    pki = tmp_path / "pki"
    if argv[0] == "add-site":
        init_pki(pki, ["127.0.0.1"])
    assert cli_main(["pki", argv[0], *argv[1:], "--dir", str(pki)]) == 2
    assert fragment in capsys.readouterr().err
    assert not (pki / "sites").exists() and (argv[0] == "add-site" or not (pki / "ca.pem").exists())


# ---- 11: what a refusal carries to the coordinator ---------------------------------------------------------------

def test_no_refusal_carries_the_sites_paths_even_with_spaces(tmp_path):
    home = tmp_path / "srvq" / "hosp data" / "ward 7x"
    home.mkdir(parents=True)
    policy = home / "policy.toml"
    cfg = from_mapping({"peft": {"method": "lora"}})  # no DP: a policy that requires it refuses
    errors = []
    for text in ("[policy]\nmax_epsilon = 8.0\nrequire_dp = true\n",  # a rule
                 "[policy]\nmax_epsilon = 'eight'\n",  # a malformed value
                 "[policy\n"):  # not TOML
        policy.write_text(text)
        with pytest.raises(PrivacyError) as info:
            loaded = site_policy(cfg, "0", str(policy))
            assert loaded is not None
            check_request(loaded, PrivacyRequest.from_config(cfg))
        errors.append(info.value)
    with pytest.raises(PrivacyError) as info:  # a missing file
        site_policy(cfg, "0", str(home / "policy-typo.toml"))
    errors.append(info.value)
    errors.append(PrivacyError(f"site 0: ledger '{home / 'privacy_ledger.jsonl'}' and {home}/audit.jsonl failed"))
    rules = []
    for error in errors:
        assert "ward 7x" in str(error), "the site's own log keeps the full message"
        refusal = Refusal.of(error)
        for fragment in ("srvq", "hosp", "data", "ward", "7x", tmp_path.name):
            assert fragment not in refusal.reason, (fragment, refusal)
        rules.append(refusal.rule)
    assert rules == ["require_dp", "policy_file", "policy_file", "policy_file", "privacy"]
    assert "rule 'require_dp': the run asks training without DP-SGD" in Refusal.of(errors[0]).reason
    assert "max_epsilon = 'eight' is invalid" in Refusal.of(errors[1]).reason


def test_a_run_config_never_makes_a_sites_own_policy_file_optional(tmp_path):
    cfg = from_mapping({"privacy": {"policy_optional": True, "policy_file": str(tmp_path / "p-{site}.toml")}})
    assert site_policy(cfg, "0") is None  # a simulated site without its file: allowed by the run
    with pytest.raises(PrivacyError, match="does not exist"):  # a deployed site's configured file: never optional
        site_policy(replace(cfg), "0", str(tmp_path / "missing.toml"))
