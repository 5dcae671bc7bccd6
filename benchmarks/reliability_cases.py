"""The cases of the reliability battery (benchmarks/reliability.py), by kind. Each provokes one situation of issue #18
with real parts and classifies what came back; the simulations are shared by the cases of their group."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from reliability import (
    SIM_TIMEOUT,
    Ctx,
    Outcome,
    Proc,
    Snapshot,
    case,
    child_env,
    classify_process_failure,
    expect_error,
    fedpeft_argv,
    kill_group,
    run,
)

TINY = ["--no-privacy", "--set", "model.name=tiny-llama", "--set", "model.max_length=32", "--set",
        "federation.num_sites=3", "--set", "data.synthetic_examples=120"]
ONE_ROUND = [*TINY, "--set", "federation.rounds=1"]  # a refusal that fails to refuse trains only one tiny round
SIM = 420.0  # a CLI command that might run a simulation


def _simulate(ctx: Ctx, *args: str, timeout: float = SIM) -> Proc:
    return ctx.cli("simulate", *ONE_ROUND, "--out", "runs", *args, timeout=timeout)


def _rows(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    records = []
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"round": "torn"})
    return records


def _finite(path: Path) -> bool | None:
    """Whether every tensor of an adapter file is finite (None: no file)."""
    if not path.is_file():
        return None
    import torch
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


# ==== config: bad values and files ==============================================================================

CONFIG_CASES = {
    "set-not-a-number": (["--set", "federation.rounds=abc"], ["federation.rounds", "abc"]),
    "set-unknown-key": (["--set", "federation.nosuch=1"], ["nosuch"]),
    "set-unknown-section": (["--set", "nosection.key=1"], ["nosection"]),
    "set-without-equals": (["--set", "federation.rounds"], ["federation.rounds"]),
    "negative-rounds": (["--set", "federation.rounds=-1"], ["federation.rounds"]),
    "zero-sites": (["--set", "federation.num_sites=0"], ["num_sites"]),
    "fraction-train-above-1": (["--set", "federation.fraction_train=2"], ["fraction_train"]),
    "negative-max-update-norm": (["--set", "federation.max_update_norm=-1"], ["max_update_norm"]),
    "unknown-aggregation": (["--set", "federation.aggregation=nosuchrule"], ["nosuchrule"]),
    "unknown-peft-method": (["--set", "peft.method=nosuchmethod"], ["nosuchmethod"]),
    "negative-epsilon": (["--set", "privacy.dp=true", "--set", "privacy.target_epsilon=-1"], ["target_epsilon"]),
    "delta-above-1": (["--set", "privacy.dp=true", "--set", "privacy.delta=2"], ["delta"]),
}


def _config_case(name: str, args: list[str], fragments: list[str]) -> None:
    def check(ctx: Ctx) -> Outcome:
        return expect_error(_simulate(ctx, "--name", "c", *args), *fragments)

    check.__doc__ = f"fedpeft simulate {' '.join(args)}: refused, naming the field"
    case("config", name)(check)


for _name, (_args, _fragments) in CONFIG_CASES.items():
    _config_case(_name, _args, _fragments)


@case("config")
def case_config_file_missing(ctx: Ctx) -> Outcome:
    """--config naming a file that does not exist"""
    return expect_error(ctx.cli("simulate", "--config", "nope.toml", "--out", "runs"), "nope.toml")


@case("config")
def case_config_file_not_toml(ctx: Ctx) -> Outcome:
    """--config with malformed TOML"""
    (ctx.dir / "bad.toml").write_text("[federation\nrounds = \n")
    return expect_error(ctx.cli("simulate", "--config", "bad.toml", "--out", "runs"), "bad.toml")


@case("config")
def case_config_file_is_a_directory(ctx: Ctx) -> Outcome:
    """--config naming a directory"""
    (ctx.dir / "conf.d").mkdir()
    return expect_error(ctx.cli("simulate", "--config", "conf.d", "--out", "runs"), "conf.d", "is a directory")


@case("config")
def case_config_file_binary(ctx: Ctx) -> Outcome:
    """--config naming a binary file"""
    (ctx.dir / "run.toml").write_bytes(os.urandom(200) + b"\xff\xfe")
    return expect_error(ctx.cli("simulate", "--config", "run.toml", "--out", "runs"), "run.toml")


@case("config")
def case_config_unknown_section_in_file(ctx: Ctx) -> Outcome:
    """a run config whose section is misspelled ([federaton])"""
    (ctx.dir / "run.toml").write_text("[federaton]\nrounds = 1\n")
    return expect_error(ctx.cli("simulate", "--config", "run.toml", "--out", "runs"), "federaton")


# ==== data files ===================================================================================================

def _data_case(ctx: Ctx, source: str, *fragments: str, extra: tuple[str, ...] = ()) -> Outcome:
    return expect_error(_simulate(ctx, "--name", "d", "--set", f"data.source={source}", *extra), *fragments)


@case("data")
def case_data_file_missing(ctx: Ctx) -> Outcome:
    """data.source naming a file that does not exist"""
    return _data_case(ctx, str(ctx.dir / "nope.csv"), "nope.csv")


@case("data")
def case_data_csv_header_only(ctx: Ctx) -> Outcome:
    """a CSV with a header and no rows"""
    return _data_case(ctx, str(_rows(ctx.dir / "empty.csv", [])), "empty.csv")


@case("data")
def case_data_csv_without_label_column(ctx: Ctx) -> Outcome:
    """a CSV whose label column is named otherwise"""
    path = _rows(ctx.dir / "rows.csv", [(f"text {i}", "ab"[i % 2]) for i in range(30)], header="text,category")
    return _data_case(ctx, str(path), "rows.csv", "label")


@case("data")
def case_data_binary_file(ctx: Ctx) -> Outcome:
    """data.source is a binary file named .csv"""
    (ctx.dir / "bin.csv").write_bytes(os.urandom(4000))
    return _data_case(ctx, str(ctx.dir / "bin.csv"), "bin.csv")


@case("data")
def case_data_source_is_a_directory(ctx: Ctx) -> Outcome:
    """data.source naming a directory"""
    (ctx.dir / "rows").mkdir()
    return _data_case(ctx, str(ctx.dir / "rows"), "rows", "is a directory")


@case("data")
def case_data_jsonl_broken_line(ctx: Ctx) -> Outcome:
    """a JSONL data file with one broken line"""
    lines = [json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) for i in range(30)]
    lines[7] = '{"text": "cut'
    (ctx.dir / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return _data_case(ctx, str(ctx.dir / "rows.jsonl"), "rows.jsonl", "line 8")


@case("data")
def case_data_unknown_extension(ctx: Ctx) -> Outcome:
    """a data file of an unknown format (.txt)"""
    (ctx.dir / "rows.txt").write_text("some text\n")
    return _data_case(ctx, str(ctx.dir / "rows.txt"), "rows.txt")


@case("data")
def case_data_gapped_integer_labels(ctx: Ctx) -> Outcome:
    """integer labels {0, 1, 1000}: a 1001-class head must not be made silently"""
    rows = [(f"text {i}", str((0, 1, 1000)[i % 3])) for i in range(60)]
    return _data_case(ctx, str(_rows(ctx.dir / "gap.csv", rows)), "gap.csv", "1000")


@case("data")
def case_data_one_row_site(ctx: Ctx) -> Outcome:
    """a site holding one row gets no held-out split"""
    path = _rows(ctx.dir / "five.csv", [(f"text {i}", "ab"[i % 2]) for i in range(5)])
    return _data_case(ctx, str(path), "1 row", extra=("--set", "federation.num_sites=5", "--set",
                                                        "data.partitioner=iid"))


# ==== §4 policy and fail-closed settings ==========================================================================

REQUIRES_DP = "[policy]\nmax_epsilon = 8.0\nrequire_dp = true\n"


def _policy_run(ctx: Ctx, texts: list[str], pattern: str, *extra: str) -> Proc:
    for site, text in enumerate(texts):
        (ctx.dir / f"site-{site}.toml").write_text(text)
    return _simulate(ctx, "--name", "p", "--set", f"privacy.policy_file={ctx.dir / pattern}", *extra)


@case("policy")
def case_policy_path_typo(ctx: Ctx) -> Outcome:
    """a typo in a {site} policy path must not turn every site's policy off"""
    proc = _policy_run(ctx, [REQUIRES_DP] * 3, "sites-{site}.toml")
    return expect_error(proc, "sites-0.toml", "does not exist", clean=[ctx.dir / "runs" / "p" / "adapters"])


@case("policy")
def case_policy_malformed_value(ctx: Ctx) -> Outcome:
    """a site policy with max_epsilon = -1"""
    proc = _policy_run(ctx, [REQUIRES_DP, "[policy]\nmax_epsilon = -1\n", REQUIRES_DP], "site-{site}.toml",
                       "--set", "privacy.dp=true")
    return expect_error(proc, "site-1.toml", "max_epsilon", clean=[ctx.dir / "runs" / "p" / "adapters"])


@case("policy")
def case_policy_not_toml(ctx: Ctx) -> Outcome:
    """a site policy file that is not TOML"""
    proc = _policy_run(ctx, [REQUIRES_DP, "[policy\nmax_epsilon = \n", REQUIRES_DP], "site-{site}.toml",
                       "--set", "privacy.dp=true")
    return expect_error(proc, "site-1.toml", clean=[ctx.dir / "runs" / "p" / "adapters"])


@case("policy")
def case_policy_refuses_every_site(ctx: Ctx) -> Outcome:
    """every site requires DP, the run asks none: refused before training, exit != 0"""
    proc = _policy_run(ctx, [REQUIRES_DP] * 3, "site-{site}.toml")
    return expect_error(proc, "require_dp", clean=[ctx.dir / "runs" / "p" / "adapters"])


@case("policy")
def case_secure_aggregation_with_two_sites(ctx: Ctx) -> Outcome:
    """secure aggregation of 2 sites: each can derive the other's update"""
    return expect_error(_simulate(ctx, "--name", "s", "--set", "federation.num_sites=2", "--set",
                                  "federation.secure_aggregation=true"), "accept_two_sites")


@case("policy")
def case_distributed_client_dp_without_secure_aggregation(ctx: Ctx) -> Outcome:
    """distributed client-level noise without secure aggregation"""
    return expect_error(_simulate(ctx, "--name", "s", "--set", "privacy.client_dp=distributed", "--set",
                                  "federation.weighting=uniform"), "secure_aggregation")


@case("policy")
def case_refusal_carries_no_site_paths(ctx: Ctx) -> Outcome:
    """a site's refusal sent to the coordinator must not carry the site's file paths"""
    script = f"""
from fedpeft.composition import from_mapping
from fedpeft.errors import PrivacyError
from fedpeft.messaging import Refusal
from fedpeft.privacy.policy import PrivacyRequest, check_request
from fedpeft.privacy.site_budget import site_policy
home = {str(ctx.dir / "hosp data" / "ward 7x")!r}
import os; os.makedirs(home, exist_ok=True)
cfg = from_mapping({{"peft": {{"method": "lora"}}}})
leaks = []
for text in ({REQUIRES_DP!r}, "[policy]\\nmax_epsilon = 'eight'\\n", "[policy\\n", None):
    path = os.path.join(home, "policy.toml" if text else "policy-typo.toml")
    if text:
        open(path, "w").write(text)
    try:
        loaded = site_policy(cfg, "0", path)
        check_request(loaded, PrivacyRequest.from_config(cfg))
        leaks.append("accepted: " + repr(text))
    except PrivacyError as err:
        reason = Refusal.of(err).reason
        if "ward 7x" in reason or "hosp data" in reason:
            leaks.append("path in refusal: " + reason)
print("LEAKS", leaks)
"""
    proc = ctx.python(script)
    failed = classify_process_failure(proc)
    if failed:
        return failed
    if "LEAKS []" in proc.out:
        return Outcome("handled", "4 refusals: rule and value named, no site path")
    return Outcome("silent-accept", proc.out.strip()[-300:])


# ==== paths and names ============================================================================================

@case("paths")
def case_out_is_a_file(ctx: Ctx) -> Outcome:
    """--out pointing at a file"""
    (ctx.dir / "a-file").write_text("keep me")
    snap = Snapshot(ctx.dir / "a-file")
    return expect_error(ctx.cli("simulate", *ONE_ROUND, "--out", "a-file/runs"), "a-file", "is a file",
                        unchanged=snap)


@case("paths")
def case_run_name_300_characters(ctx: Ctx) -> Outcome:
    """a 300-character run name"""
    return expect_error(_simulate(ctx, "--name", "x" * 300), "run.name")


@case("paths")
def case_run_name_escapes_out_dir(ctx: Ctx) -> Outcome:
    """--name ../escape must not write outside --out"""
    (ctx.dir / "runs").mkdir()
    return expect_error(_simulate(ctx, "--name", "../escape"), "run.name", clean=[ctx.dir / "escape"])


@case("paths")
def case_run_name_empty(ctx: Ctx) -> Outcome:
    """--name '' (the run would be written into --out itself)"""
    proc = _simulate(ctx, "--name", "")
    if proc.rc == 0 and (ctx.dir / "runs" / "metrics.jsonl").exists():
        return Outcome("silent-accept", "the run was written into --out itself")
    if proc.rc == 0 and not classify_process_failure(proc):
        return Outcome("handled", f"an empty --name means the default name: {proc.out.splitlines()[:1]}")
    return expect_error(proc, "name")


@case("paths")
def case_export_out_is_a_file(ctx: Ctx) -> Outcome:
    """export --out naming a file"""
    (ctx.dir / "a-file").write_text("keep me")
    return expect_error(ctx.cli("export", str(ctx.dir), "--out", "a-file"), "a-file", "is a file",
                        unchanged=Snapshot(ctx.dir / "a-file"))


@case("paths")
def case_export_missing_run(ctx: Ctx) -> Outcome:
    """export of a run directory that does not exist"""
    return expect_error(ctx.cli("export", "runs/nowhere", "--out", "exported"), "nowhere")


@case("paths")
def case_audit_report_out_is_a_directory(ctx: Ctx) -> Outcome:
    """audit report --out naming a directory"""
    log = _coordinator_log(ctx.dir / "coordinator.jsonl")
    return expect_error(ctx.cli("audit", "report", str(log), "--out", str(ctx.dir)), "--out", "is a directory")


@case("paths")
def case_site_config_missing(ctx: Ctx) -> Outcome:
    """client --site-config naming a file that does not exist"""
    return expect_error(ctx.cli("client", "--site-config", "nope/site.toml", "--check", timeout=90), "site.toml")


@case("paths")
def case_server_pki_missing(ctx: Ctx) -> Outcome:
    """server --pki naming a directory that does not exist"""
    return expect_error(ctx.cli("server", "--pki", "nope-pki", "--no-privacy", "--state-dir", "state",
                                timeout=90), "nope-pki")


# ==== audit logs: damaged, tampered, ε going down =================================================================

def _coordinator_log(path: Path, rounds: int = 3) -> Path:
    from fedpeft.audit.keys import generate_key, public_key_b64
    from fedpeft.audit.log import AuditLog

    key = generate_key()
    log = AuditLog(path, key, "coordinator")
    log.append("run-start", {"run": "r", "public_key": public_key_b64(key), "config": {}})
    for number in range(1, rounds + 1):
        log.append("round", {"round": number, "aggregated": True, "sampled": ["0", "1"], "refusals": {}})
    log.append("run-end", {"final_adapter": None})
    return path


def _tampered(ctx: Ctx, edit) -> tuple[Path, Snapshot]:
    path = _coordinator_log(ctx.dir / "coordinator.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))
    return path, Snapshot(path)


def _verify(ctx: Ctx, edit, *fragments: str) -> Outcome:
    path, snap = _tampered(ctx, edit)
    return expect_error(ctx.cli("audit", "verify", str(path)), *fragments, unchanged=snap)


@case("audit")
def case_audit_edited_record(ctx: Ctx) -> Outcome:
    """a round record's field edited"""
    return _verify(ctx, lambda ls: [ls[0], ls[1].replace('"round":1', '"round":7'), *ls[2:]], "line 2")


@case("audit")
def case_audit_deleted_record(ctx: Ctx) -> Outcome:
    """a record deleted from the middle"""
    return _verify(ctx, lambda ls: [ls[0], *ls[2:]], "line")


@case("audit")
def case_audit_reordered_records(ctx: Ctx) -> Outcome:
    """two records swapped"""
    return _verify(ctx, lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "line")


@case("audit")
def case_audit_forged_record_appended(ctx: Ctx) -> Outcome:
    """a record appended by someone without the key"""
    def forge(lines):
        last = json.loads(lines[-1])
        last.update(seq=last.get("seq", 0) + 1, kind="round", data={"round": 9, "aggregated": True})
        return [*lines, json.dumps(last) + "\n"]

    return _verify(ctx, forge, "line")


@case("audit")
def case_audit_truncated_log(ctx: Ctx) -> Outcome:
    """the run-end record cut off (a log shortened at a line boundary)"""
    return _verify(ctx, lambda ls: ls[:-1], "run-end")


@case("audit")
def case_audit_torn_tail(ctx: Ctx) -> Outcome:
    """the last line torn mid-write (a crash while appending)"""
    path, snap = _tampered(ctx, lambda ls: [*ls[:-1], ls[-1][: len(ls[-1]) // 2]])
    proc = ctx.cli("audit", "verify", str(path))
    failed = classify_process_failure(proc)
    if failed:
        return failed
    if snap.changed():
        return Outcome("data-loss", "; ".join(snap.changed()))
    if proc.rc == 0 and "torn" not in proc.text.lower() and "partial" not in proc.text.lower():
        return Outcome("silent-accept", "exit 0 without a word of the torn line")
    if proc.rc == 0:
        return Outcome("handled", f"the torn tail named: {proc.text.strip().splitlines()[-1][:200]}")
    return expect_error(proc, "line")


@case("audit")
def case_audit_wrong_public_key(ctx: Ctx) -> Outcome:
    """verify against a trusted public key that is not the writer's"""
    from fedpeft.audit.keys import generate_key, public_key_b64

    path = _coordinator_log(ctx.dir / "coordinator.jsonl")
    return expect_error(ctx.cli("audit", "verify", str(path), "--pubkey", public_key_b64(generate_key())), "wrong key")


@case("audit")
def case_audit_report_of_damaged_log(ctx: Ctx) -> Outcome:
    """audit report on an edited log: the report says so and the exit code is not 0"""
    path, _ = _tampered(ctx, lambda ls: [ls[0], ls[1].replace('"round":1', '"round":7'), *ls[2:]])
    proc = ctx.cli("audit", "report", str(path), "--out", "report.html")
    outcome = expect_error(proc, "damaged")
    report = ctx.dir / "report.html"
    if outcome.cls == "clear-error" and not (report.is_file() and "DAMAGED" in report.read_text()):
        return Outcome("misleading-error", "exit != 0 but the report does not say the log is damaged")
    return outcome


@case("audit")
def case_audit_verify_missing_file(ctx: Ctx) -> Outcome:
    """audit verify on a file that does not exist"""
    return expect_error(ctx.cli("audit", "verify", "missing.jsonl"), "missing.jsonl", "does not exist")


@case("audit")
def case_audit_verify_binary_key_file(ctx: Ctx) -> Outcome:
    """audit verify --pubkey naming a binary file"""
    path = _coordinator_log(ctx.dir / "coordinator.jsonl")
    (ctx.dir / "audit.pub").write_bytes(os.urandom(48) + b"\xff")
    return expect_error(ctx.cli("audit", "verify", str(path), "--pubkey", "audit.pub"), "audit.pub")


@case("audit")
def case_audit_verify_garbage_file(ctx: Ctx) -> Outcome:
    """audit verify on a file that is not a log at all"""
    (ctx.dir / "log.jsonl").write_bytes(os.urandom(3000))
    return expect_error(ctx.cli("audit", "verify", "log.jsonl"), "log.jsonl")


@case("audit")
def case_audit_crosscheck_site_is_a_directory(ctx: Ctx) -> Outcome:
    """audit verify --site naming a directory"""
    path = _coordinator_log(ctx.dir / "coordinator.jsonl")
    return expect_error(ctx.cli("audit", "verify", "--site", str(ctx.dir), "--server", str(path)), "is not a file")


# ---- §1: ε that goes down --------------------------------------------------------------------------------------

def _epsilon_logs(ctx: Ctx) -> tuple[Path, Path]:
    from fedpeft.audit.keys import generate_key
    from fedpeft.audit.log import AuditLog

    server = AuditLog(ctx.dir / "coordinator.jsonl", generate_key(), "coordinator")
    server.append("run-start", {"public_key": server.public_key, "run": "r",
                                "config": {"privacy": {"target_epsilon": 7.5}}})
    for number, eps in enumerate([{"0": 6.8, "1": 7.0, "2": 7.4}, {"0": 7.3, "1": 5.05, "2": 7.44}], start=1):
        server.append("round", {"round": number, "sites_sampled": sorted(eps), "sites_returned": sorted(eps),
                                "payload_sha256": {s: f"{s}{number}" * 8 for s in eps}, "site_epsilon": eps})
    server.append("run-end", {"site_epsilon": {"0": 7.3, "1": 5.05, "2": 7.44}})
    site = AuditLog(ctx.dir / "site.jsonl", generate_key(), "site:1")
    site.append("site-start", {"public_key": site.public_key, "site": "1"})
    for run_name, number, eps in [("old", 1, 6.8), ("r", 1, 5.05)]:
        site.append("release", {"run": run_name, "round": number, "payload_sha256": f"1{number}" * 8,
                                "payload_bytes": 1, "secure_aggregation": False, "epsilon": eps,
                                "ledger_line_sha256": "a" * 64})
    return ctx.dir / "coordinator.jsonl", ctx.dir / "site.jsonl"


@case("ledger")
def case_epsilon_decrease_in_coordinator_log(ctx: Ctx) -> Outcome:
    """audit verify: a site's ε 7.0 -> 5.05 between rounds is a privacy failure"""
    server, _ = _epsilon_logs(ctx)
    return expect_error(ctx.cli("audit", "verify", str(server)), "privacy failure", "site 1")


@case("ledger")
def case_epsilon_decrease_cross_check(ctx: Ctx) -> Outcome:
    """audit verify --site/--server: the coordinator's ε below the site's own earlier one"""
    server, site = _epsilon_logs(ctx)
    return expect_error(ctx.cli("audit", "verify", "--site", str(site), "--server", str(server)), "decreased")


@case("ledger")
def case_epsilon_decrease_in_report(ctx: Ctx) -> Outcome:
    """audit report of a log where a site's ε goes down"""
    server, _ = _epsilon_logs(ctx)
    proc = ctx.cli("audit", "report", str(server), "--out", "report.md")
    failed = classify_process_failure(proc)
    if failed:
        return failed
    report = ctx.dir / "report.md"
    shown = report.is_file() and "DECREASED" in report.read_text().upper()
    if not shown:
        return Outcome("silent-accept", f"exit {proc.rc}; the report does not show the decrease")
    if proc.rc == 0:
        return Outcome("silent-accept", "the report shows the decrease but the command exits 0")
    return Outcome("clear-error", f"exit {proc.rc}; report shows the decrease: {proc.first_error()}")


# ==== pki ==========================================================================================================

PKI_CASES = {
    "host-with-space-and-bang": (["init", "--host", "bad host!"], "bad host!"),
    "host-ip-out-of-range": (["init", "--host", "10.0.0.300"], "10.0.0.300"),
    "host-leading-dash": (["init", "--host=-lead.example.org"], "-lead"),
    "host-given-twice": (["init", "--host", "a.example", "--host", "a.example"], "a.example"),
    "coordinator-without-port": (["add-site", "a", "--coordinator", "notaport"], "notaport"),
    "coordinator-bad-host": (["add-site", "a", "--coordinator", "bad!:9092"], "bad!"),
    "coordinator-port-out-of-range": (["add-site", "a", "--coordinator", "host:99999"], "99999"),
    "site-name-with-path": (["add-site", "../evil", "--coordinator", "127.0.0.1:9092"], "../evil"),
    "rotate-unknown-site": (["rotate-site", "ghost"], "ghost"),
    "remove-unknown-site": (["remove-site", "ghost"], "ghost"),
}


def _pki_case(name: str, argv: list[str], fragment: str) -> None:
    def check(ctx: Ctx) -> Outcome:
        pki = ctx.dir / "pki"
        if argv[0] != "init":
            from fedpeft.deploy.pki import init_pki

            init_pki(pki, ["127.0.0.1"])
        snap = Snapshot(pki)
        clean = [pki / "sites"] if argv[0] == "add-site" else [] if argv[0] != "init" else [pki / "ca.pem"]
        clean += [ctx.dir / "evil"]
        return expect_error(ctx.cli("pki", argv[0], *argv[1:], "--dir", str(pki)), fragment, unchanged=snap,
                            clean=clean)

    check.__doc__ = f"fedpeft pki {' '.join(argv)}"
    case("pki", name)(check)


for _name, (_argv, _fragment) in PKI_CASES.items():
    _pki_case(_name, _argv, _fragment)


@case("pki")
def case_pki_init_over_an_existing_pki(ctx: Ctx) -> Outcome:
    """pki init on a directory that holds a PKI must not replace its CA"""
    from fedpeft.deploy.pki import init_pki

    init_pki(ctx.dir / "pki", ["127.0.0.1"])
    snap = Snapshot(ctx.dir / "pki")
    return expect_error(ctx.cli("pki", "init", "--dir", "pki", "--host", "127.0.0.1"), "already holds",
                        unchanged=snap)


@case("pki")
def case_pki_add_site_twice(ctx: Ctx) -> Outcome:
    """pki add-site of a name that exists must not replace its node key"""
    from fedpeft.deploy.pki import add_site, init_pki

    init_pki(ctx.dir / "pki", ["127.0.0.1"])
    add_site(ctx.dir / "pki", "site-a", "127.0.0.1:9092")
    snap = Snapshot(ctx.dir / "pki")
    return expect_error(ctx.cli("pki", "add-site", "site-a", "--dir", "pki", "--coordinator", "127.0.0.1:9092"),
                        "site-a", "already", unchanged=snap)


@case("pki")
def case_pki_add_site_without_pki(ctx: Ctx) -> Outcome:
    """pki add-site into a directory that holds no PKI"""
    return expect_error(ctx.cli("pki", "add-site", "a", "--dir", "nopki", "--coordinator", "127.0.0.1:9092"),
                        "nopki", clean=[ctx.dir / "nopki" / "sites"])


@case("pki")
def case_pki_init_crash_leaves_no_half_key(ctx: Ctx) -> Outcome:
    """pki init killed between its file writes: no truncated key, and the next init says what is there"""
    pki = ctx.dir / "pki"
    proc = ctx.python(f"""
import os
from fedpeft.io import atomic
real, calls = os.replace, [0]
def crash(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os._exit(17)
    return real(*args, **kwargs)
atomic.os.replace = crash
from fedpeft.deploy.pki import init_pki
init_pki({str(pki)!r}, ["127.0.0.1"])
""")
    if proc.rc != 17:
        return classify_process_failure(proc) or Outcome("handled", f"the writer did not reach the crash point "
                                                                    f"(exit {proc.rc}); nothing to check")
    broken = []
    for path in sorted(pki.rglob("*")) if pki.is_dir() else []:
        if path.is_file() and (path.stat().st_size == 0 or (path.suffix in (".pem", ".key")
                                                            and b"-----END" not in path.read_bytes())):
            broken.append(path.name)
    if broken:
        return Outcome("data-loss", f"half-written files after the crash: {broken}")
    again = ctx.cli("pki", "init", "--dir", "pki", "--host", "127.0.0.1")
    failed = classify_process_failure(again)
    if failed:
        return failed
    left = sorted(p.name for p in pki.iterdir() if p.name.startswith("."))
    return Outcome("handled", f"whole files only{'; temp files left: ' + str(left) if left else ''}; next init: "
                              f"exit {again.rc} {again.first_error()[:120]}")


# ==== deployment: site bundle and agent ============================================================================

def _bundle(ctx: Ctx) -> Path:
    from fedpeft.deploy.pki import add_site, init_pki

    pki = init_pki(ctx.dir / "pki", ["127.0.0.1"])
    site = add_site(pki, "hospital-a", "127.0.0.1:9").directory
    (site / "data.csv").write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
    config = site / "site.toml"
    config.write_text(config.read_text().replace('"/path/to/local/data.csv"', '"data.csv"'))
    return site


def _check(ctx: Ctx, site: Path, *fragments: str) -> Outcome:
    return expect_error(ctx.cli("client", "--site-config", str(site / "site.toml"), "--check", "--attempts", "1",
                                timeout=120), *fragments)


@case("deploy")
def case_client_check_audit_key_world_readable(ctx: Ctx) -> Outcome:
    """client --check with audit.key mode 0644"""
    site = _bundle(ctx)
    (site / "audit.key").chmod(0o644)
    return _check(ctx, site, "audit.key", "0644")


@case("deploy")
def case_client_check_audit_key_not_a_key(ctx: Ctx) -> Outcome:
    """client --check with audit.key holding random bytes"""
    site = _bundle(ctx)
    (site / "audit.key").write_bytes(os.urandom(64))
    return _check(ctx, site, "audit.key")


@case("deploy")
def case_client_check_audit_key_missing(ctx: Ctx) -> Outcome:
    """client --check with audit.key deleted"""
    site = _bundle(ctx)
    (site / "audit.key").unlink()
    return _check(ctx, site, "audit.key", "does not exist")


@case("deploy")
def case_client_check_node_key_world_readable(ctx: Ctx) -> Outcome:
    """client --check with node.key mode 0644"""
    site = _bundle(ctx)
    (site / "node.key").chmod(0o644)
    return _check(ctx, site, "node.key", "0644")


@case("deploy")
def case_client_check_site_toml_not_toml(ctx: Ctx) -> Outcome:
    """client --check with a site.toml that is not TOML"""
    site = _bundle(ctx)
    (site / "site.toml").write_text("[site\nname = \n")
    return _check(ctx, site, "site.toml")


@case("deploy")
def case_client_check_data_file_missing(ctx: Ctx) -> Outcome:
    """client --check when the site's data file is gone"""
    site = _bundle(ctx)
    (site / "data.csv").unlink()
    return _check(ctx, site, "data.csv")


@case("deploy")
def case_client_check_site_policy_malformed(ctx: Ctx) -> Outcome:
    """client --check with a malformed site policy"""
    site = _bundle(ctx)
    (site / "policy.toml").write_text("[policy]\nmax_epsilon = 'eight'\n")
    return _check(ctx, site, "max_epsilon")


@case("deploy")
def case_server_key_readable_by_group(ctx: Ctx) -> Outcome:
    """fedpeft server with the coordinator's server.key mode 0640"""
    from fedpeft.deploy.pki import init_pki

    pki = init_pki(ctx.dir / "pki", ["127.0.0.1"])
    (pki / "server.key").chmod(0o640)
    return expect_error(ctx.cli("server", "--pki", str(pki), "--no-privacy", "--state-dir", "state", "--port",
                                "39391", timeout=120), "server.key", "0640")


@case("deploy")
def case_agent_under_systemd_path(ctx: Ctx) -> Outcome:
    """the documented systemd unit: PATH=/usr/bin:/bin, the venv's fedpeft by absolute path, coordinator down"""
    site = _bundle(ctx)
    env = child_env({"PATH": "/usr/bin:/bin"})
    ctx.note("PATH=/usr/bin:/bin (the unit's PATH; the venv's scripts are not on it)")
    proc = ctx.cli("client", "--site-config", str(site / "site.toml"), "--attempts", "1", timeout=120, env=env)
    if "not on the path" in proc.text.lower():
        return Outcome("misleading-error", f"the agent cannot find Flower's commands: {proc.first_error()}")
    return expect_error(proc, "127.0.0.1:9")


@case("deploy")
def case_agent_supernode_dies(ctx: Ctx) -> Outcome:
    """the SuperNode dies (flower-superexec not on its PATH): the agent must stop and say why, not hang"""
    site = _bundle(ctx)
    empty = ctx.dir / "empty-path"
    empty.mkdir()
    proc = ctx.python(f"""
import functools, sys
from fedpeft.deploy import agent
from fedpeft.deploy.agent import load_site_settings
from fedpeft.deploy.processes import runtime_env
from fedpeft.errors import DeployError

site = load_site_settings({str(site / "site.toml")!r})
agent.runtime_env = lambda home, extra=None: {{**runtime_env(home), "PATH": {str(empty)!r}}}
agent.check_flower_commands = lambda env: None  # past the start-up check: the command vanished after it
agent.wait_for_coordinator = lambda *args: None
agent._run_supernode = functools.partial(agent._run_supernode, grace=1.0)
try:
    agent.run_agent(site, echo=lambda line: None)
except DeployError as err:
    print("fedpeft: error:", err, file=sys.stderr)
    sys.exit(2)
print("the agent returned")
""", timeout=150)
    return expect_error(proc, "flower-supernode", "flower-superexec")


# ==== run directory: resume refusals, torn files, crash windows =====================================================

def _plain_runs() -> dict:
    """Run A (3 rounds) and, while it runs, a resume of it and a second run under its name; kill -9 A after its
    first round, then resume it. The second run's completed directory is the base of the resume cases."""
    base = Path(os.environ["RELIABILITY_ROOT"]) / "_plain"
    base.mkdir(parents=True, exist_ok=True)
    args = [*fedpeft_argv(), "simulate", *TINY, "--out", "runs", "--name", "same"]
    # Rounds of this size take about a second: 60 of them keep run A going while the other commands start (each
    # takes 10-30 s to import torch); A is killed long before its end.
    rounds = "federation.rounds=60"
    a_dir = base / "runs" / "same"
    env = child_env()
    log = {"base": base}
    first_log = open(base / "first.log", "w")
    first = subprocess.Popen([*args, "--set", rounds], cwd=base, env=env, stdout=first_log,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    second = None
    try:
        _wait_for(lambda: len(_metrics(a_dir)) >= 1 or first.poll() is not None, SIM)
        log["resume_while_running"] = run([*args, "--set", rounds, "--resume"], cwd=base)
        log["first_alive_after_resume"] = first.poll() is None
        out, err = open(base / "second.out", "w"), open(base / "second.err", "w")
        started = time.monotonic()
        second = subprocess.Popen([*args, "--set", "federation.rounds=1"], cwd=base,
                                  env=child_env({"PYTHONUNBUFFERED": "1"}), stdout=out, stderr=err, text=True,
                                  start_new_session=True)
        _wait_for(lambda: "fedpeft run ->" in (base / "second.out").read_text() or second.poll() is not None
                  or first.poll() is not None, SIM)  # the second run has claimed its directory
        _wait_for(lambda: len(_metrics(a_dir)) >= 2 or first.poll() is not None, SIM)
        log["first_alive_at_kill"] = first.poll() is None
        log["first_rounds_at_kill"] = [r.get("round") for r in _metrics(a_dir)]
        _kill_tree(first)
        try:
            second.wait(timeout=SIM)
            rc, timed_out = second.returncode, False
        except subprocess.TimeoutExpired:
            _kill_tree(second)
            rc, timed_out = None, True
        out.close()
        err.close()
        log["second"] = Proc(second.args, rc, (base / "second.out").read_text(), (base / "second.err").read_text(),
                             timed_out, time.monotonic() - started)
    finally:
        _kill_tree(first)
        if second is not None and second.poll() is None:
            _kill_tree(second)
        first_log.close()
    log["after_kill"] = [r.get("round") for r in _metrics(a_dir)]
    log["resumed"] = run([*args, "--set", rounds, "--resume"], cwd=base, timeout=SIM)
    return log


def _wait_for(condition, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not condition():
        time.sleep(0.5)


def _kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 the process and every process it started (Ray's workers), by their ids."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        children = []
    kill_group(proc)
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


def _plain(ctx: Ctx) -> dict:
    return Ctx.fixture("plain-runs", _plain_runs)


@case("run-dir", slow=True)
def case_concurrent_resume_refused(ctx: Ctx) -> Outcome:
    """--resume of a run directory another run is writing: refused with the holder's PID"""
    runs = _plain(ctx)
    ctx.note(f"while `fedpeft simulate {' '.join(TINY)} --out runs --name same --set federation.rounds=60` runs in "
             f"{runs['base']}: the same command with --resume")
    outcome = expect_error(runs["resume_while_running"], "PID", "in use")
    if outcome.cls == "silent-accept" and not runs["first_alive_after_resume"]:
        return Outcome("silent-accept", outcome.detail + " (but the first run had ended by then: not provoked)")
    return outcome


@case("run-dir", slow=True)
def case_concurrent_second_run_same_name(ctx: Ctx) -> Outcome:
    """a second run with the same --out/--name while the first runs: one directory each"""
    runs = _plain(ctx)
    ctx.note(f"while `fedpeft simulate {' '.join(TINY)} --out runs --name same --set federation.rounds=60` runs in "
             f"{runs['base']}: the same command again, rounds=1")
    second: Proc = runs["second"]
    failed = classify_process_failure(second)
    if failed:
        return failed
    a_rounds = runs["after_kill"]
    if a_rounds != sorted(set(a_rounds)) or a_rounds[:1] != [0]:
        return Outcome("data-loss", f"the first run's metrics.jsonl logs rounds {a_rounds}")
    if second.rc != 0:
        return expect_error(second, "same")
    where = next((line for line in second.out.splitlines() if "fedpeft run ->" in line), "")
    if where.rstrip().split("(")[0].strip().endswith("runs/same"):
        return Outcome("data-loss", f"the second run wrote into the first's directory: {where}")
    note = "" if runs["first_alive_at_kill"] else " (the first run had ended before: not provoked)"
    return Outcome("handled", f"second run in its own directory ({where.split('->')[-1].split('(')[0].strip()}) "
                              f"while the first ran; first logs rounds {a_rounds[0]}-{a_rounds[-1]} in order{note}")


@case("run-dir", slow=True)
def case_kill9_then_resume(ctx: Ctx) -> Outcome:
    """kill -9 a run after its first round, then --resume: no round lost or run twice"""
    runs = _plain(ctx)
    ctx.note(f"in {runs['base']}: `fedpeft simulate {' '.join(TINY)} --out runs --name same --set "
             "federation.rounds=60`, kill -9 its process group after round 1's metrics line, then the same with "
             "--resume")
    resumed: Proc = runs["resumed"]
    failed = classify_process_failure(resumed)
    if failed:
        return failed
    rounds = [r.get("round") for r in _metrics(runs["base"] / "runs" / "same")]
    if resumed.rc != 0:
        return expect_error(resumed, "same")
    if rounds != list(range(61)):
        return Outcome("data-loss", f"after kill -9 at {runs['after_kill']} and resume: rounds {rounds}")
    if not runs["first_alive_at_kill"]:
        return Outcome("handled", f"rounds {rounds[0]}-{rounds[-1]} (the first run had ended before the kill: "
                                  "not provoked)")
    verify = run([*fedpeft_argv(), "audit", "verify", "runs/same/audit/coordinator.jsonl"], cwd=runs["base"])
    if verify.rc != 0:
        return Outcome("data-loss", f"rounds {rounds} but the audit log does not verify: {verify.first_error()}")
    killed = runs["after_kill"]
    return Outcome("handled", f"killed after round {killed[-1]}; resumed: rounds {rounds[0]}-{rounds[-1]}, each once; "
                              "audit log intact")


def _completed_copy(ctx: Ctx) -> tuple[Path, str]:
    """A copy of a completed 1-round run, resumable from ctx.dir with `--out runs --name <name>`."""
    runs = _plain(ctx)
    second: Proc = runs["second"]
    line = next((line for line in second.out.splitlines() if "fedpeft run ->" in line), "")
    name = line.split("->")[1].split("(")[0].strip().rsplit("/", 1)[-1] if "->" in line else ""
    source = runs["base"] / "runs" / name
    if second.rc != 0 or not name or not (source / "server_state.safetensors").is_file():
        raise RuntimeError(f"no completed run to copy (second run exit {second.rc}: {second.first_error()})")
    shutil.copytree(source, ctx.dir / "runs" / name, ignore=shutil.ignore_patterns("run.lock"))
    return ctx.dir / "runs" / name, name


def _resume(ctx: Ctx, name: str, *extra: str) -> Proc:
    return ctx.cli("simulate", *ONE_ROUND, "--out", "runs", "--name", name, "--resume", *extra, timeout=SIM)


@case("run-dir", slow=True)
def case_resume_without_server_state(ctx: Ctx) -> Outcome:
    """--resume with server_state.safetensors deleted: refused, nothing written"""
    run_dir, name = _completed_copy(ctx)
    (run_dir / "server_state.safetensors").unlink()
    snap = Snapshot(run_dir)
    return expect_error(_resume(ctx, name), "server_state.safetensors", "missing", unchanged=snap)


@case("run-dir", slow=True)
def case_resume_with_garbage_server_state(ctx: Ctx) -> Outcome:
    """--resume with server_state.safetensors overwritten by random bytes"""
    run_dir, name = _completed_copy(ctx)
    (run_dir / "server_state.safetensors").write_bytes(os.urandom(500))
    snap = Snapshot(run_dir)
    return expect_error(_resume(ctx, name), "server_state.safetensors", unchanged=snap)


@case("run-dir", slow=True)
def case_resume_with_another_config(ctx: Ctx) -> Outcome:
    """--resume with another aggregation: refused before run_config.json is touched; export --merge still works"""
    run_dir, name = _completed_copy(ctx)
    snap = Snapshot(run_dir)
    outcome = expect_error(_resume(ctx, name, "--set", "federation.aggregation=fedadam"), "federation.aggregation",
                           unchanged=snap)
    export = ctx.cli("export", str(run_dir), "--out", "exported", "--merge", timeout=SIM)
    if classify_process_failure(export) or export.rc != 0:
        return Outcome("data-loss", f"export --merge after the refused resume: exit {export.rc}: "
                                    f"{export.first_error()}")
    return outcome


@case("run-dir", slow=True)
def case_resume_over_torn_metrics_line(ctx: Ctx) -> Outcome:
    """--resume after a crash left a torn last line in metrics.jsonl: moved aside, the resume goes on"""
    run_dir, name = _completed_copy(ctx)
    with open(run_dir / "metrics.jsonl", "ab") as handle:
        handle.write(b'{"round": 2, "global_acc')
    proc = _resume(ctx, name)
    failed = classify_process_failure(proc)
    if failed:
        return failed
    rounds = [r.get("round") for r in _metrics(run_dir)]
    torn = run_dir / "metrics.jsonl.torn"
    if proc.rc != 0:
        return Outcome("misleading-error" if "torn" not in proc.text else "clear-error",
                       f"resume refused: {proc.first_error()}")
    if rounds != [0, 1] or not torn.is_file() or b"global_acc" not in torn.read_bytes():
        return Outcome("data-loss", f"rounds {rounds}; torn file {'kept' if torn.is_file() else 'missing'}")
    return Outcome("handled", f"torn tail moved to metrics.jsonl.torn, rounds {rounds}")


@case("run-dir", slow=True)
def case_resume_over_damaged_metrics_line(ctx: Ctx) -> Outcome:
    """--resume when a complete metrics line is not JSON"""
    run_dir, name = _completed_copy(ctx)
    with open(run_dir / "metrics.jsonl", "ab") as handle:
        handle.write(b"not json\n")
    snap = Snapshot(run_dir)
    return expect_error(_resume(ctx, name), "metrics.jsonl", "line 3", unchanged=snap)


@case("run-dir", slow=True)
def case_resume_over_interleaved_log(ctx: Ctx) -> Outcome:
    """--resume of a directory whose metrics log holds two runs' rounds (0,1,0,1)"""
    run_dir, name = _completed_copy(ctx)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines + lines))
    snap = Snapshot(run_dir)
    return expect_error(_resume(ctx, name), "metrics.jsonl", unchanged=snap)


@case("run-dir", slow=True)
def case_resume_state_older_than_log(ctx: Ctx) -> Outcome:
    """--resume when metrics.jsonl logs a round the saved state does not hold"""
    run_dir, name = _completed_copy(ctx)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"round": 2, "aggregated": True}) + "\n")
    snap = Snapshot(run_dir)
    return expect_error(_resume(ctx, name, "--set", "federation.rounds=3"), "metrics.jsonl", "round 2",
                        unchanged=snap)


@case("run-dir")
def case_resume_of_a_run_that_never_ran(ctx: Ctx) -> Outcome:
    """--resume --name of a run that does not exist"""
    return expect_error(_resume(ctx, "never-ran"), "never-ran", clean=[ctx.dir / "runs" / "never-ran" / "adapters"])


@case("run-dir", slow=True)
def case_export_round_that_does_not_exist(ctx: Ctx) -> Outcome:
    """export --round 99 of a 1-round run"""
    run_dir, _ = _completed_copy(ctx)
    return expect_error(ctx.cli("export", str(run_dir), "--round", "99", "--out", "exported"), "99")


CRASH = """
import os, shutil, sys
from pathlib import Path
from fedpeft.io import atomic

def crash_before(module, name, nth):
    real, calls = getattr(module, name), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os._exit(17)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)
"""

WINDOWS = {
    "crash-dir-swap-while-filling": "",
    "crash-dir-swap-before-marking-complete": 'crash_before(atomic.os, "rename", 1)',
    "crash-dir-swap-before-moving-old-aside": 'crash_before(atomic.os, "rename", 2)',
    "crash-dir-swap-between-the-renames": 'crash_before(atomic.os, "rename", 3)',
    "crash-dir-swap-before-removing-old": 'crash_before(atomic.shutil, "rmtree", 1)',
}


def _window_case(name: str, crash: str) -> None:
    def check(ctx: Ctx) -> Outcome:
        from fedpeft.io.atomic import recover_dirs_in, settled_dir, write_dir_atomic

        target = ctx.dir / "adapters" / "round-0004"
        write_dir_atomic(target, lambda tmp: (tmp / "adapter_model.safetensors").write_text("old"))
        fill_crash = "os._exit(17)" if not crash else "pass"
        proc = ctx.python(CRASH + f"""
{crash}
def fill(tmp):
    (tmp / "adapter_model.safetensors").write_text("new")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights").write_text("new")
    {fill_crash}
atomic.write_dir_atomic(Path({str(target)!r}), fill)
""")
        if proc.rc != 17:
            return classify_process_failure(proc) or Outcome("data-loss", f"the writer did not crash (exit {proc.rc})")

        def contents(path):
            return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}

        whole = ({"adapter_model.safetensors": "old"},
                 {"adapter_model.safetensors": "new", "sub/weights": "new"})
        seen = settled_dir(target)
        if seen is None or contents(seen) not in whole:
            return Outcome("data-loss", f"a reader finds {contents(seen) if seen else 'no copy'}")
        recover_dirs_in(target.parent)
        left = sorted(p.name for p in target.parent.iterdir())
        if not target.is_dir() or contents(target) not in whole or left != ["round-0004"]:
            return Outcome("data-loss", f"after the next start: {left}, {contents(target) if target.is_dir() else ''}")
        return Outcome("handled", f"a whole copy ({contents(target)['adapter_model.safetensors']}) before and after "
                                  "the repair")

    check.__doc__ = f"an adapter directory swap killed ({crash or 'while the new copy is filled'})"
    case("crash", name)(check)


for _name, _crash in WINDOWS.items():
    _window_case(_name, _crash)


@case("crash")
def case_crash_file_write_before_rename(ctx: Ctx) -> Outcome:
    """a state file write killed before its rename: the old file stays whole"""
    target = ctx.dir / "server_state.safetensors"
    target.write_bytes(b"old round")
    proc = ctx.python(CRASH + f"""
crash_before(atomic.os, "replace", 1)
atomic.write_bytes_atomic({str(target)!r}, b"new round, longer than the old one")
""")
    if proc.rc != 17:
        return classify_process_failure(proc) or Outcome("data-loss", f"the writer did not crash (exit {proc.rc})")
    if target.read_bytes() != b"old round":
        return Outcome("data-loss", f"the file holds {target.read_bytes()[:40]!r}")
    return Outcome("handled", "the old file is whole")


@case("crash")
def case_crash_torn_jsonl_then_append(ctx: Ctx) -> Outcome:
    """a JSONL writer killed mid-line, then the next append: the torn part is set aside, not glued on"""
    from fedpeft.io.atomic import append_jsonl

    path = ctx.dir / "metrics.jsonl"
    append_jsonl(path, {"round": 0})
    proc = ctx.python(f"""
import os
with open({str(path)!r}, "ab") as handle:
    handle.write(b'{{"round": 1, "glob')
    handle.flush()
    os._exit(17)
""")
    if proc.rc != 17:
        return classify_process_failure(proc) or Outcome("data-loss", f"the writer did not crash (exit {proc.rc})")
    append_jsonl(path, {"round": 1})
    try:
        rounds = [json.loads(line)["round"] for line in path.read_text().splitlines()]
    except json.JSONDecodeError as err:
        return Outcome("data-loss", f"the next line was glued to the torn one: {err}")
    if rounds != [0, 1]:
        return Outcome("data-loss", f"rounds {rounds}")
    return Outcome("handled", "torn part moved aside; rounds [0, 1]")


@case("crash")
def case_pki_files_are_private_from_the_start(ctx: Ctx) -> Outcome:
    """pki init: private keys 0600, public files 0644, no temp file left"""
    proc = ctx.cli("pki", "init", "--dir", "pki", "--host", "127.0.0.1")
    if proc.rc != 0:
        return classify_process_failure(proc) or Outcome("misleading-error", proc.first_error())
    pki = ctx.dir / "pki"
    wrong = [f"{p.name} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in pki.iterdir()
             if p.suffix == ".key" and stat.S_IMODE(p.stat().st_mode) != 0o600]
    temps = [p.name for p in pki.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    if wrong or temps:
        return Outcome("data-loss", f"modes {wrong}, temp files {temps}")
    return Outcome("handled", "keys 0600, no temp file")


# ==== §1 ledgers on a real federation ============================================================================

DP = ["--no-privacy", "--set", "model.name=tiny-llama", "--set", "model.max_length=32", "--set", "train.batch_size=16",
      "--set", "federation.num_sites=4", "--set", "federation.min_sites=1", "--set", "federation.eval_every=10",
      "--set", "data.synthetic_examples=160", "--set", "data.partitioner=iid", "--set", "privacy.dp=true",
      "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.target_epsilon=50", "--set",
      "privacy.accountant=rdp", "--out", "runs", "--name", "dp"]


def _ledger_runs() -> dict:
    """A DP run of 2 rounds; then site 1's ledger deleted, site 0's cut short, site 2's last line edited; resumed
    for a third round."""
    from fedpeft.privacy.ledger import PrivacyLedger

    base = Path(os.environ["RELIABILITY_ROOT"]) / "_ledger"
    base.mkdir(parents=True, exist_ok=True)
    argv = [*fedpeft_argv(), "simulate", *DP]
    first = run([*argv, "--set", "federation.rounds=2"], cwd=base, timeout=SIM)
    if first.rc != 0:
        raise RuntimeError(f"the first DP run failed: exit {first.rc}: {first.first_error()}")
    ledgers = {p.parent.name.removeprefix("site-"): p for p in (base / "runs" / "sites").glob("*/site-*/"
                                                                                             "privacy_ledger.jsonl")}
    if set(ledgers) != set("0123"):
        raise RuntimeError(f"ledgers found: {sorted(ledgers)} under {base / 'runs' / 'sites'}")
    spent = {site: PrivacyLedger(path).epsilon_spent() for site, path in ledgers.items()}
    ledgers["1"].unlink()
    lines = ledgers["0"].read_text().splitlines()
    ledgers["0"].write_text("".join(line + "\n" for line in lines[:-1]))
    lines = ledgers["2"].read_text().splitlines()
    last = json.loads(lines[-1])
    last["noise_multiplier"] = 3.0
    ledgers["2"].write_text("".join(line + "\n" for line in [*lines[:-1], json.dumps(last)]))
    tampered = {site: ledgers[site].read_bytes() for site in "02"}
    resumed = run([*argv, "--set", "federation.rounds=3", "--resume"], cwd=base, timeout=SIM)
    return {"base": base, "ledgers": ledgers, "spent": spent, "tampered": tampered, "resumed": resumed,
            "last": (_metrics(base / "runs" / "dp") or [{}])[-1]}


def _ledger_case(ctx: Ctx, site: str, words: str) -> Outcome:
    runs = Ctx.fixture("ledger-runs", _ledger_runs)
    ctx.note(f"in {runs['base']}: `fedpeft simulate {' '.join(DP)} --set federation.rounds=2`; site 1's ledger "
             "deleted, site 0's last line cut, site 2's last noise_multiplier set to 3.0; the same with --set "
             "federation.rounds=3 --resume")
    resumed: Proc = runs["resumed"]
    failed = classify_process_failure(resumed)
    if failed:
        return failed
    last = runs["last"]
    if last.get("round") != 3:
        return Outcome("single-site-abort", f"the resumed run did not log round 3: exit {resumed.rc} "
                                            f"{resumed.first_error()}")
    if site in (last.get("site_epsilon") or {}):
        return Outcome("silent-accept", f"site {site} trained: ε {last['site_epsilon'][site]} (spent before: "
                                        f"{runs['spent'][site]:.3f})")
    ledger = runs["ledgers"][site]
    if (site in runs["tampered"] and ledger.read_bytes() != runs["tampered"][site]) or (site == "1"
                                                                                       and ledger.exists()):
        return Outcome("data-loss", f"the refused site's ledger {ledger} was written")
    reason = (last.get("refusals") or {}).get(site, "")
    if words not in reason:
        return Outcome("misleading-error", f"site {site} did not train; refusal: {reason[:200]!r}")
    return Outcome("clear-error", f"site {site} refused before training: {reason[:160]}")


@case("ledger", slow=True)
def case_ledger_deleted(ctx: Ctx) -> Outcome:
    """a site's ledger deleted between runs, then --resume"""
    return _ledger_case(ctx, "1", "is missing")


@case("ledger", slow=True)
def case_ledger_cut_short(ctx: Ctx) -> Outcome:
    """a site's ledger with its last line cut, then --resume"""
    return _ledger_case(ctx, "0", "shorter")


@case("ledger", slow=True)
def case_ledger_last_line_edited(ctx: Ctx) -> Outcome:
    """a site's ledger whose last noise multiplier was raised (a lower ε), then --resume"""
    return _ledger_case(ctx, "2", "was edited")


@case("ledger", slow=True)
def case_ledger_untampered_site_trains_on(ctx: Ctx) -> Outcome:
    """the one untouched site trains on while the three tampered ones refuse"""
    runs = Ctx.fixture("ledger-runs", _ledger_runs)
    last, resumed = runs["last"], runs["resumed"]
    failed = classify_process_failure(resumed)
    if failed:
        return failed
    eps = (last.get("site_epsilon") or {}).get("3")
    if last.get("round") != 3 or not last.get("aggregated") or eps is None:
        return Outcome("single-site-abort", f"round 3 did not aggregate site 3's update: exit {resumed.rc}, "
                                            f"{resumed.first_error()}")
    if eps <= runs["spent"]["3"]:
        return Outcome("silent-accept", f"site 3's ε {eps} is not above its earlier {runs['spent']['3']}")
    verify = run([*fedpeft_argv(), "audit", "verify", "runs/dp/audit/coordinator.jsonl"], cwd=runs["base"])
    if verify.rc != 0:
        return Outcome("data-loss", f"the coordinator's log does not verify: {verify.first_error()}")
    return Outcome("handled", f"site 3 trained (ε {runs['spent']['3']:.2f} -> {eps:.2f}); the log verifies")


@case("ledger", slow=True)
def case_ledger_survives_a_new_run_name(ctx: Ctx) -> Outcome:
    """a run under a new --name on the same data continues each site's ledger (never starts at zero)"""
    runs = Ctx.fixture("ledger-runs", _ledger_runs)
    from dataclasses import replace

    from fedpeft.composition import from_mapping
    from fedpeft.privacy.ledger import PrivacyLedger
    from fedpeft.privacy.site_budget import site_ledger_path

    nested = json.loads((runs["base"] / "runs" / "dp" / "run_config.json").read_text())
    nested["run"]["out_dir"] = str(runs["base"] / "runs")  # "runs" was relative to where the runs started
    cfg = from_mapping(nested)
    renamed = replace(cfg, run=replace(cfg.run, name="another-name"))
    path = site_ledger_path(renamed, "3").resolve()
    if path != runs["ledgers"]["3"].resolve():
        return Outcome("silent-accept", f"a run named another-name keeps site 3's ledger at {path}, not "
                                        f"{runs['ledgers']['3']}: its ε would start at 0")
    return Outcome("handled", f"same ledger, ε {PrivacyLedger(path).epsilon_spent():.2f} carried over")


# ==== §2 attacks on the aggregation: real tiny federations, one malicious site ==================================

ATTACK = """
import json, math, sys
from flwr.app import Array, ArrayRecord, MessageType
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
import numpy as np
from fedpeft import wire
from fedpeft.cli import _trained_or_why
from fedpeft.composition import from_mapping
from fedpeft.simulations.engine import simulate

ATTACKER, SECURE, ROUNDS = 2, {secure}, {rounds}
original = InMemoryGrid.send_and_receive
attacker = {{}}

def tamper(reply, server_round):
    metrics = reply.content.get(wire.METRICS)
    if SECURE:  # the weight coordinate of the masked vector: its top bit flipped, a negative weight
        masked = reply.content[wire.SA_MASKED]
        key = next(iter(masked))
        ring = masked[key].numpy().copy()
        ring[-1] = ring[-1] + np.array(2 ** (8 * ring.itemsize - 1), dtype=ring.dtype)
        reply.content[wire.SA_MASKED] = ArrayRecord({{key: Array(ring)}})
    elif server_round == 1:  # a finite update of 1e20
        update = reply.content[wire.ADAPTER].to_torch_state_dict()
        reply.content[wire.ADAPTER] = ArrayRecord({{n: t * 1e20 for n, t in update.items()}})
    elif server_round in (2, 3, 4, 5):
        metrics[wire.NUM_EXAMPLES] = {{2: 1e9, 3: math.inf, 4: 0, 5: -5}}[server_round]
    elif server_round == 6:
        metrics[wire.PARTITION_ID] = 0  # "my update and my epsilon are site 0's"
    elif server_round == 7:
        update = reply.content[wire.ADAPTER].to_torch_state_dict()
        reply.content[wire.ADAPTER] = ArrayRecord({{n: t * math.nan for n, t in update.items()}})

def send_and_receive(self, messages, *args, **kwargs):
    replies = list(original(self, messages, *args, **kwargs))
    for reply in replies:
        if reply.has_error() or reply.metadata.message_type != MessageType.TRAIN:
            continue
        metrics = reply.content.get(wire.METRICS)
        if "node" not in attacker and metrics is not None and metrics.get(wire.PARTITION_ID) == ATTACKER:
            attacker["node"] = reply.metadata.src_node_id
            json.dump({{"node": attacker["node"]}}, open("attacker.json", "w"))
        if reply.metadata.src_node_id == attacker.get("node"):
            tamper(reply, int(reply.metadata.group_id or 0))
    return replies

InMemoryGrid.send_and_receive = send_and_receive
cfg = from_mapping({{
    "model": {{"name": "tiny-llama", "max_length": 32}},
    "train": {{"learning_rate": 5e-3}},
    "federation": {{"rounds": ROUNDS, "num_sites": 3, "aggregation": "fedavg", "secure_aggregation": SECURE,
                    "eval_every": ROUNDS}},
    "data": {{"synthetic_examples": 150}},
    "run": {{"name": "attack", "out_dir": "runs"}},
}})
result = simulate(cfg)
print("run ->", result.run_dir, "final accuracy", result.summary.get("final_accuracy"))
sys.exit(_trained_or_why(result.run_dir))
"""

ATTACK_ROUNDS = {1: "update-1e20", 2: "examples-1e9", 3: "examples-inf", 4: "examples-0", 5: "examples-negative",
                 6: "spoofed-partition", 7: "nan-update"}


def _attack_run(secure: bool) -> dict:
    base = Path(os.environ["RELIABILITY_ROOT"]) / ("_secure" if secure else "_attack")
    base.mkdir(parents=True, exist_ok=True)
    script = base / "attack.py"
    script.write_text(ATTACK.format(secure=secure, rounds=1 if secure else len(ATTACK_ROUNDS)))
    proc = run([sys.executable, str(script)], cwd=base, timeout=SIM_TIMEOUT)
    node = json.loads((base / "attacker.json").read_text())["node"] if (base / "attacker.json").is_file() else None
    return {"base": base, "script": script, "proc": proc, "rounds": _metrics(base / "runs" / "attack"),
            "node": None if node is None else str(node)}


def _attack_case(ctx: Ctx, server_round: int) -> Outcome:
    got = Ctx.fixture("attack-run", lambda: _attack_run(False))
    ctx.note(f"(cd {got['base']} && python3 {got['script']})  # round {server_round}: "
             f"{ATTACK_ROUNDS[server_round]} from site 2")
    proc: Proc = got["proc"]
    if proc.timed_out:
        return Outcome("hang", f"the federation did not end in {proc.seconds:.0f} s")
    record = next((r for r in got["rounds"] if r.get("round") == server_round), None)
    if record is None:
        if classify_process_failure(proc):
            return classify_process_failure(proc)
        return Outcome("single-site-abort", f"the run ended before round {server_round}: exit {proc.rc} "
                                            f"{proc.first_error()}")
    failures = record.get("failures") or {}
    mine_keys = {got["node"], f"node-{got['node']}", "2"}
    honest = {k: v for k, v in failures.items() if k not in mine_keys and "site 2" not in v}
    finite = _finite(got["base"] / "runs" / "attack" / "adapters" / f"round-{server_round:04d}" /
                     "adapter_model.safetensors")
    if finite is False:
        return Outcome("data-loss", f"round {server_round}'s saved global adapter holds NaN/inf")
    if not record.get("aggregated") or honest:
        return Outcome("single-site-abort", f"round {server_round}: aggregated={record.get('aggregated')}, honest "
                                            f"sites failing: {honest}")
    attack = ATTACK_ROUNDS[server_round]
    mine = " ".join(v for k, v in failures.items() if k not in honest)
    if attack == "update-1e20":
        clipped = record.get("clipped_update_norms") or {}
        following = next((r for r in got["rounds"] if r.get("round") == 2), {})
        if following and any(k not in mine_keys and "site 2" not in v
                             for k, v in (following.get("failures") or {}).items()):
            return Outcome("single-site-abort", f"round 2's honest sites fail: {following['failures']}")
        if "2" in clipped:
            return Outcome("handled", f"site 2's update clipped on the server (norm {clipped['2']:.3g}), round "
                                      "aggregated")
        return Outcome("data-loss" if finite is False else "silent-accept", f"no clipping recorded: {clipped}")
    if attack == "examples-1e9":
        clipped = record.get("clipped_examples") or {}
        if "2" in clipped:
            return Outcome("handled", f"site 2's claim clipped ({clipped['2']:.3g} -> max_examples)")
        return Outcome("silent-accept", "a claim of 1e9 examples taken as is")
    if attack == "spoofed-partition":
        if "is site 2" in mine and "partition 0" in mine:
            return Outcome("handled", f"refused and named: {mine[:160]}")
        return Outcome("silent-accept", f"site 2 filed under partition 0 without a word ({failures})")
    if not mine:
        return Outcome("silent-accept", f"round {server_round} took site 2's {attack} ({record.get('sites_returned')}"
                                        " updates)")
    if "site 2" not in mine:
        return Outcome("misleading-error", f"dropped without naming the site: {mine[:160]}")
    return Outcome("handled", f"site 2 dropped and named, the round aggregated the others: {mine[:140]}")


for _round, _attack in ATTACK_ROUNDS.items():
    def _make(server_round: int):
        def check(ctx: Ctx) -> Outcome:
            return _attack_case(ctx, server_round)

        check.__doc__ = f"site 2 sends {ATTACK_ROUNDS[server_round]} in round {server_round} (plain FedAvg)"
        return check

    case("attack", _attack, slow=True)(_make(_round))


@case("attack", "secure-weight-sum-negative", slow=True)
def case_secure_weight_sum(ctx: Ctx) -> Outcome:
    """under secure aggregation site 2 pushes the decoded weight sum below zero"""
    got = Ctx.fixture("secure-run", lambda: _attack_run(True))
    ctx.note(f"(cd {got['base']} && python3 {got['script']})")
    proc: Proc = got["proc"]
    failed = classify_process_failure(proc)
    if failed:
        return failed
    record = next((r for r in got["rounds"] if r.get("round") == 1), None)
    if record is None:
        return Outcome("single-site-abort", f"no round 1 logged: exit {proc.rc} {proc.first_error()}")
    if _finite(got["base"] / "runs" / "attack" / "adapters" / "round-0001" / "adapter_model.safetensors") is False:
        return Outcome("data-loss", "a non-finite global adapter was saved")
    if record.get("aggregated"):
        return Outcome("silent-accept", "the round aggregated a sum decoded with a weight sum <= 0")
    integrity = record.get("integrity") or ""
    if not integrity.startswith("integrity failure") or proc.rc == 0 or "integrity failure" not in proc.err:
        return Outcome("misleading-error", f"round not aggregated; integrity {integrity[:100]!r}, exit {proc.rc}")
    return Outcome("clear-error", f"round refused as an integrity failure, exit {proc.rc}: {integrity[:120]}")
