"""Fail closed, and say so (issue #18 §4): a mistake that would silently weaken a run is refused before training,
exit codes say whether anything useful happened, and no bad input ends in a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedpeft.audit.keys import generate_key, public_key_b64
from fedpeft.audit.log import AuditLog
from fedpeft.cli import _trained_or_why
from fedpeft.cli import main as cli_main
from fedpeft.composition import from_mapping, run_warnings
from fedpeft.errors import ConfigError, FederationError, PrivacyError
from fedpeft.privacy.site_budget import site_policy
from fedpeft.simulations.engine import check_sites

REQUIRES_DP = "[policy]\nmax_epsilon = 8.0\nrequire_dp = true\n"


def _policies(tmp_path: Path, *texts: str) -> None:
    for site, text in enumerate(texts):
        (tmp_path / f"site-{site}.toml").write_text(text)


def _cfg(tmp_path: Path, policy_file: str, **privacy):
    return from_mapping({"federation": {"num_sites": 3}, "data": {"synthetic_examples": 60},
                         "privacy": {"policy_file": str(tmp_path / policy_file), **privacy},
                         "run": {"out_dir": str(tmp_path / "runs")}})


# ---- 1: a missing policy file is an error unless the run says policies are optional -----------------------------

def test_a_typo_in_a_per_site_policy_path_is_an_error_before_training(tmp_path):
    _policies(tmp_path, REQUIRES_DP, REQUIRES_DP, REQUIRES_DP)
    typo = _cfg(tmp_path, "sites-{site}.toml")  # the files are site-N.toml
    with pytest.raises(PrivacyError) as info:
        check_sites(typo)  # what `fedpeft simulate` runs before Ray starts
    message = str(info.value)
    assert "sites-0.toml" in message and "does not exist" in message and "privacy.policy_optional = true" in message
    assert info.value.rule == "policy_file"
    optional = _cfg(tmp_path, "sites-{site}.toml", policy_optional=True)
    assert site_policy(optional, "0") is None  # said knowingly: sites without a file train under the run config
    assert len(check_sites(optional)) == 3


# ---- 2: a run no site would train in is refused before training; exit codes say whether anything trained -------

def test_a_malformed_policy_or_one_that_refuses_every_site_stops_the_run_before_training(tmp_path):
    _policies(tmp_path, REQUIRES_DP, "[policy]\nmax_epsilon = -1\n", REQUIRES_DP)
    with pytest.raises(PrivacyError, match=r"site-1\.toml: \[policy\] max_epsilon = -1\.0 is invalid"):
        check_sites(_cfg(tmp_path, "site-{site}.toml"))
    _policies(tmp_path, REQUIRES_DP, REQUIRES_DP, REQUIRES_DP)
    with pytest.raises(FederationError) as info:  # the run asks no DP; every site requires it
        check_sites(_cfg(tmp_path, "site-{site}.toml"))
    message = str(info.value)
    assert "no round of this run could train: 3 of 3 sites" in message
    assert message.count("rule 'require_dp'") == 3 and "site-2.toml" in message
    _policies(tmp_path, REQUIRES_DP, "[policy]\nmax_epsilon = 8.0\nrequire_dp = false\n", REQUIRES_DP)
    assert len(check_sites(_cfg(tmp_path, "site-{site}.toml"))) == 3  # one site can train: the run goes ahead


def test_a_run_in_which_no_site_trained_exits_non_zero_with_the_reason(tmp_path, capsys):
    rounds = [{"round": 0, "aggregated": False},
              {"round": 1, "aggregated": False, "refusals": {"0": "privacy budget spent"}, "failures": {}},
              {"round": 2, "aggregated": False, "refusals": {"0": "site policy rule 'require_dp': ..."},
               "failures": {"node-7": "no reply within 60 s"}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    assert _trained_or_why(tmp_path) == 1
    err = capsys.readouterr().err
    assert "no site trained in any round" in err and "site 0 refused: site policy rule 'require_dp'" in err
    assert "node-7 failed: no reply within 60 s" in err
    rounds[1]["aggregated"] = True
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    assert _trained_or_why(tmp_path) == 0


# ---- 3: a report of a damaged log is written, and exits non-zero ------------------------------------------------

def _coordinator_log(path: Path) -> Path:
    key = generate_key()
    log = AuditLog(path, key, "coordinator")
    log.append("run-start", {"run": "r", "public_key": public_key_b64(key), "config": {}})
    log.append("round", {"round": 1, "aggregated": True, "sampled": ["0"], "refusals": {}})
    log.append("run-end", {"final_adapter": None})
    return path


def test_audit_report_on_a_damaged_log_exits_non_zero(tmp_path, capsys):
    log = _coordinator_log(tmp_path / "coordinator.jsonl")
    assert cli_main(["audit", "report", str(log), "--out", str(tmp_path / "ok.html")]) == 0
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[1].replace('"round":1', '"round":2'), lines[2]]) + "\n")
    assert cli_main(["audit", "report", str(log), "--out", str(tmp_path / "damaged.html")]) == 1
    assert "LOG DAMAGED" in (tmp_path / "damaged.html").read_text()
    assert "DAMAGED — first problem: edited: line 2" in capsys.readouterr().err


# ---- 5: secure aggregation that hides nothing, noise shares without a secure sum --------------------------------

def test_two_site_secure_aggregation_and_unmasked_noise_shares_are_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"each site can derive the other site's update.*secagg\.accept_two_sites"):
        from_mapping({"federation": {"num_sites": 2, "secure_aggregation": True}})
    with pytest.raises(ConfigError, match=r"fraction_train"):  # 2 of 5 sites per round is the same
        from_mapping({"federation": {"num_sites": 5, "fraction_train": 0.4, "secure_aggregation": True}})
    knowingly = from_mapping({"federation": {"num_sites": 2, "secure_aggregation": True},
                              "secagg": {"accept_two_sites": True}})
    assert [w for w in run_warnings(knowingly) if "accept_two_sites = true" in w]
    assert run_warnings(from_mapping({"federation": {"num_sites": 3, "secure_aggregation": True}})) == []
    with pytest.raises(ConfigError, match=r"'privacy.client_dp' = 'distributed'.*federation\.secure_aggregation"):
        from_mapping({"privacy": {"client_dp": "distributed"}, "federation": {"weighting": "uniform"}})


# ---- 10: bad input to the commands ends in a message and exit 2, never a traceback -----------------------------

def test_bad_audit_files_and_paths_exit_2_with_a_message(tmp_path, capsys):
    log = _coordinator_log(tmp_path / "coordinator.jsonl")
    binary = tmp_path / "audit.pub"
    binary.write_bytes(os.urandom(48) + b"\xff")
    (tmp_path / "a-file").write_text("")
    cases = [
        (["audit", "verify", str(tmp_path / "missing.jsonl")], "audit log '", "missing.jsonl' does not exist"),
        (["audit", "verify", str(log), "--pubkey", str(binary)], "--pubkey '", "is a binary file, not a public key"),
        (["audit", "verify", str(log), "--pubkey", str(tmp_path / "nope.pub")], "--pubkey '", "does not exist"),
        (["audit", "verify", "--site", str(tmp_path), "--server", str(log)], "(--site) '", "is not a file"),
        (["audit", "report", str(log), "--out", str(tmp_path)], "--out '", "is a directory"),
        (["audit", "report", str(log), "--out", str(tmp_path / "a-file" / "r.html")], "a-file' is a file", ""),
        (["simulate", "--no-privacy", "--name", "x" * 300], "'run.name'", "at most 200 bytes"),
        (["simulate", "--no-privacy", "--out", str(tmp_path / "a-file" / "runs")], "a-file' is a file", ""),
        (["export", str(tmp_path), "--out", str(tmp_path / "a-file")], "--out '", "is a file, not a directory"),
    ]
    for argv, *fragments in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fedpeft: error: ") and "Traceback" not in err
        assert all(fragment in err for fragment in fragments), (argv, err)
