"""The `fedpeft` command: one entry with sub-commands (simulate, export, predict, evaluate, pki, server, client,
audit)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from fedpeft.errors import FedpeftError


def _parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    import tomllib

    overrides: dict[str, object] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise FedpeftError(f"--set {pair!r}: write overrides as section.key=value (e.g. federation.rounds=3)")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value  # a bare word is a string, as on Flower's --run-config
    return overrides


# `fedpeft simulate` with no config: private by default. Each site's example-level epsilon is 8 (delta 1e-5), the
# noise split among the sites under secure aggregation, one DP step per round (docs/privacy.md).
PRIVATE_QUICKSTART: dict[str, object] = {
    "peft.method": "probe", "privacy.dp": True, "privacy.dp_mode": "distributed", "privacy.target_epsilon": 8.0,
    "federation.secure_aggregation": True, "federation.aggregation": "server-sgd", "federation.rounds": 0,
    "federation.eval_every": 20, "secagg.max_weight": 2000.0, "data.synthetic_examples": 4000,
}


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a simulated federation on Flower's simulation engine",
                       description="Run a federation of simulated sites. With no options, private by default: 5 "
                                   "sites train a linear probe on the packaged all-MiniLM-L6-v2's features for a "
                                   "generated support-ticket task, under distributed DP (epsilon 8 per site) and "
                                   "secure aggregation. --no-privacy: the same sites fine-tune LoRA with plain "
                                   "FedAvg.")
    p.add_argument("--config", help="TOML run config (sections [model] [peft] [train] [federation] [data] [run])")
    p.add_argument("--no-privacy", action="store_true",
                   help="without a --config: the non-private quick start (LoRA, plain FedAvg) instead of the private "
                        "default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set federation.rounds=3)")
    p.add_argument("--out", help="directory under which the run directory is created (default: ./runs)")
    p.add_argument("--name", help="run name (default: quickstart)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run named --name after its last completed round (e.g. with more rounds)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--cpus-per-site", type=float, default=1.0,
                   help="CPUs each simulated site's Ray actor reserves (default 1: one actor per core)")
    p.add_argument("--gpus-per-site", type=float, default=0.0,
                   help="GPUs each site's actor reserves, e.g. 0.25 for four sites per GPU (default 0: CPU)")
    p.add_argument("--ray-address", help="run on this Ray cluster ('auto' or HOST:PORT); default $RAY_ADDRESS if "
                                         "set, else a fresh local Ray instance (docs/scale.md)")


def simulate_config(args: argparse.Namespace) -> Any:
    """The run config `fedpeft simulate` runs: --config (or, without one, the private quick start unless
    --no-privacy), with --set, --out and --name on top."""
    overrides = _parse_overrides(args.overrides)
    if args.out:
        overrides["run.out_dir"] = args.out
    if args.name:
        overrides["run.name"] = args.name
    if not args.config and not args.no_privacy:
        overrides = {**PRIVATE_QUICKSTART, **overrides}
    return _load_config(args.config, overrides)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.simulations.report import print_result

    cfg = simulate_config(args)
    _directory_for(cfg.run.out_dir, "run.out_dir (--out)")
    _warn(cfg)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fedpeft.simulations.engine import simulate

    result = simulate(cfg, verbose=args.verbose, resume=args.resume, cpus_per_site=args.cpus_per_site,
                      gpus_per_site=args.gpus_per_site, ray_address=args.ray_address)
    print_result(result)
    return _trained_or_why(result.run_dir)


def _directory_for(path: str, what: str) -> None:
    """``path`` is, or can be made, a directory: nothing on the way is a file (FedpeftError naming it otherwise)."""
    from pathlib import Path

    target = Path(path).expanduser()
    blocker = next((p for p in [*reversed(target.parents), target] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FedpeftError(f"{what} '{path}': '{blocker}' is a file, not a directory; choose another directory")


def _warn(cfg: Any) -> None:
    """Settings a run accepted knowingly, said once where it starts."""
    from fedpeft.composition import run_warnings

    for warning in run_warnings(cfg):
        print(f"fedpeft: warning: {warning}", file=sys.stderr)


def _trained_or_why(run_dir: Any) -> int:
    """0 when some round of the run aggregated an update; otherwise 1, saying why no site trained (a run that only
    evaluated the initial adapter produced nothing)."""
    import json
    from pathlib import Path

    metrics = Path(run_dir) / "metrics.jsonl"
    rounds = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] >= 1:
                rounds.append(record)
    if any(record.get("aggregated") for record in rounds):
        return 0
    why = []
    for record in rounds[-1:]:
        why += [f"site {site} refused: {reason}" for site, reason in (record.get("refusals") or {}).items()]
        why += [f"{site} failed: {reason}" for site, reason in (record.get("failures") or {}).items()]
        why += [f"round {record['round']}: {record['unchanged_because']}"] if record.get("unchanged_because") else []
    detail = "; ".join(why) if why else ("no round was run" if not rounds else "too few usable updates each round")
    print(f"fedpeft: error: no site trained in any round of {run_dir}, so the run produced nothing: {detail}",
          file=sys.stderr)
    return 1


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's global adapter (optionally merged into the base) for serving")
    p.add_argument("run_dir", help="the run directory, e.g. runs/quickstart")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--round", type=int, default=None, help="which round's adapter (default: the latest)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into a full-precision copy of the base and save the whole model")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")


def _cmd_export(args: argparse.Namespace) -> int:
    _directory_for(args.out, "--out")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedpeft.runs.export import export_run

    out = export_run(args.run_dir, args.out, args.round, merge=args.merge, force=args.force)
    print(f"exported {'merged model' if args.merge else 'adapter'} to {out} (labels and how to load it: "
          f"{out}/README.md)")
    return 0


def _predict_parsers(sub: argparse._SubParsersAction) -> None:
    for name, text in (("predict", "classify texts with an exported model (merged or adapter), offline"),
                       ("evaluate", "score an exported model on a labelled .csv/.jsonl: accuracy, macro-F1, per "
                                    "class")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("model", help="the directory `fedpeft export` wrote")
        p.add_argument("--input", default="-", help=".csv or .jsonl file; '-' (default): stdin, one text per line")
        p.add_argument("--text-column", default="text", help="column holding the text (default: text)")
        if name == "predict":
            p.add_argument("--out", help=".csv or .jsonl to write: each row with its prediction (default: one label "
                                         "per line on stdout)")
        else:
            p.add_argument("--label-column", default="label", help="column holding the true label (default: label)")
            p.add_argument("--json", action="store_true", help="print the scores as JSON")


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedpeft.runs.predict import evaluate_rows, load_exported, predict_texts, read_rows, write_predictions

    rows = read_rows(args.input, args.text_column)
    exported = load_exported(args.model)
    if args.command == "predict":
        write_predictions(rows, predict_texts(exported, [row[args.text_column] for row in rows]), args.out)
        if args.out:
            print(f"{len(rows)} predictions written to {args.out}", file=sys.stderr)
        return 0
    scores = evaluate_rows(exported, rows, text_column=args.text_column,
                           label_column=args.label_column, source=args.input)
    print(json.dumps(scores.to_dict(), indent=2) if args.json else "\n".join(scores.lines()))
    return 0


def _pki_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", help="the federation's certificates and site keys")
    pki = p.add_subparsers(dest="pki_command", required=True)
    init = pki.add_parser("init", help="create the CA and the coordinator's TLS certificate")
    init.add_argument("--dir", required=True, help="PKI directory to create (keep it with the coordinator)")
    init.add_argument("--host", action="append", default=[], required=True,
                      help="a host name or IP the coordinator serves (repeatable)")
    site = pki.add_parser("add-site", help="register a site from the public keys it made (`fedpeft client keygen`) "
                                           "and write the bundle for its IT team (no private key)")
    site.add_argument("name", help="the site's name (letters, digits, '.', '_', '-')")
    site.add_argument("--dir", required=True, help="the PKI directory made by `fedpeft pki init`")
    site.add_argument("--coordinator", required=True, help="host:port the site's agent dials out to")
    _site_key_arguments(site, "the site's node.pub (from `fedpeft client keygen` at the site)")
    rotate = pki.add_parser("rotate-site", help="register a site's new node key (the coordinator swaps it at its "
                                                "next start)")
    rotate.add_argument("name")
    rotate.add_argument("--dir", required=True, help="the PKI directory")
    _site_key_arguments(rotate, "the site's new node.pub (`fedpeft client keygen --node-key-only --force`)")
    remove = pki.add_parser("remove-site", help="take a site out of the federation (the coordinator unregisters "
                                                "its key at its next start)")
    remove.add_argument("name")
    remove.add_argument("--dir", required=True, help="the PKI directory")


def _site_key_arguments(p: argparse.ArgumentParser, node_help: str) -> None:
    # No option makes the coordinator generate a site's keys: whoever holds a site's audit.key can forge its log.
    p.add_argument("--public-key", metavar="NODE_PUB", help=node_help + " (required)")
    p.add_argument("--audit-public-key", metavar="AUDIT_PUB",
                   help="the site's audit.pub (required for add-site; with rotate-site: only for a new audit key)")


def _cmd_pki(args: argparse.Namespace) -> int:
    from fedpeft.deploy.pki import init_pki, remove_site

    if args.pki_command == "rotate-site":
        _pki_rotate(args)
    elif args.pki_command == "add-site":
        _pki_add_site(args)
    elif args.pki_command == "remove-site":
        moved = remove_site(args.dir, args.name)
        print(f"site '{args.name}' removed (bundle moved to {moved}); `fedpeft server` unregisters its key at its "
              "next start")
    elif args.pki_command == "init":
        directory = init_pki(args.dir, args.host)
        print(f"created the CA and the coordinator certificate for {', '.join(args.host)} in {directory} "
              "(private keys: ca.key, server.key, mode 0600)")
    return 0


def _pki_add_site(args: argparse.Namespace) -> None:
    from pathlib import Path

    from fedpeft.deploy.pki import add_site, check_new_site
    from fedpeft.deploy.site_keys import KEYGEN_FIX, SitePublicKeys, node_fingerprint

    check_new_site(args.dir, args.name, args.coordinator)  # the name and address first, as without keys
    missing = [option for option, value in (("--public-key", args.public_key),
                                            ("--audit-public-key", args.audit_public_key)) if not value]
    if missing:
        raise FedpeftError(f"pki add-site {args.name}: {' and '.join(missing)} missing; {KEYGEN_FIX}, and you pass "
                           "them: --public-key node.pub --audit-public-key audit.pub")
    bundle = add_site(args.dir, args.name, args.coordinator,
                      SitePublicKeys(Path(args.public_key), Path(args.audit_public_key)))
    node_line = bundle.public_key.read_text(encoding="ascii").strip()
    print(f"site '{args.name}' registered from its public keys (node key {node_fingerprint(node_line)}; compare "
          f"with what the site's keygen printed). Send these files of {bundle.directory} back to the site: ca.pem, "
          "site.toml, policy.toml. No private key is in them, and none is needed: the site has its own. "
          "policy.toml requires DP (require_dp = true): the run config must set privacy.dp = true, or this "
          "site refuses every round. `fedpeft server` registers the key at its next start.")


def _pki_rotate(args: argparse.Namespace) -> None:
    from fedpeft.deploy.pki import existing_bundle, rotate_site
    from fedpeft.deploy.site_keys import find_site_private_keys, node_fingerprint

    existing_bundle(args.dir, args.name)  # an unknown site is named first
    if not args.public_key:
        raise FedpeftError(f"pki rotate-site {args.name}: --public-key missing; the site makes its new key with "
                           "`fedpeft client keygen --out DIR --node-key-only --force` and sends node.pub")
    bundle = rotate_site(args.dir, args.name, args.public_key, args.audit_public_key)
    node_line = bundle.public_key.read_text(encoding="ascii").strip()
    what = "node and audit public keys" if args.audit_public_key else "node public key"
    print(f"site '{args.name}': new {what} registered in {bundle.directory} (node key {node_fingerprint(node_line)}; "
          "old files kept as *.retired-*); restart `fedpeft server` to swap the registered key")
    left = [path for path in find_site_private_keys(args.dir) if bundle.directory in path.parents]
    if left:
        print(f"fedpeft: warning: private keys of site '{args.name}' are still in {bundle.directory} "
              f"({', '.join(p.name for p in left)}); delete them: `fedpeft server` will not start while they are "
              "there", file=sys.stderr)


def _server_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="run the coordinator: SuperLink (TLS, node authentication) and one run",
                       description="Start the coordinator, register the sites of the PKI, run the federation to its "
                                   "end. Started again with the same config, it resumes after the last completed "
                                   "round.")
    p.add_argument("--pki", required=True, help="the PKI directory made by `fedpeft pki init`")
    p.add_argument("--config", help="TOML run config (as for `fedpeft simulate`)")
    p.add_argument("--no-privacy", action="store_true",
                   help="without a --config: the non-private quick start (LoRA, plain FedAvg) instead of the private "
                        "default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--state-dir", default="coordinator", help="the coordinator's working directory "
                   "(SuperLink database, logs; default ./coordinator)")
    p.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    p.add_argument("--port", type=int, default=9092, help="port the sites connect to (default 9092)")
    p.add_argument("--site", action="append", default=[], help="only these sites (default: every site of the PKI)")


def _cmd_server(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from fedpeft.deploy.coordinator import Coordinator, CoordinatorSettings
    from fedpeft.deploy.preflight import check_audit_key
    from fedpeft.deploy.site_keys import check_no_site_private_keys

    check_no_site_private_keys(args.pki)  # first: nothing starts while the coordinator holds a site's private key
    cfg = _load_config(args.config, _parse_overrides(args.overrides))
    _warn(cfg)
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(Path(cfg.run.out_dir).expanduser().resolve())))
    _directory_for(cfg.run.out_dir, "run.out_dir")
    _directory_for(args.state_dir, "--state-dir")
    if not cfg.run.audit_key and (Path(args.pki) / "audit.key").is_file():  # the coordinator's own audit key
        cfg = replace(cfg, run=replace(cfg.run, audit_key=str((Path(args.pki) / "audit.key").resolve())))
    if cfg.run.audit_key:
        check_audit_key(cfg.run.audit_key, "the coordinator's audit key (run.audit_key)",
                        f"use the audit.key that `fedpeft pki init` made in {args.pki}, or set run.audit_key to it")
    settings = CoordinatorSettings(pki_dir=Path(args.pki), config=cfg, state_dir=Path(args.state_dir).resolve(),
                                   host=args.host, port=args.port, sites=tuple(args.site))
    status = Coordinator(settings).run()
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    print(f"run {status}; results in {run_dir}")
    return _trained_or_why(run_dir) if status == "finished:completed" else 1


def _client_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="run a site's agent: it dials out to the coordinator and trains locally",
                       description="Start this site's agent with the settings of its site.toml (from the bundle "
                                   "of `fedpeft pki add-site`); `fedpeft client keygen` makes the site's keys.")
    client = p.add_subparsers(dest="client_command")  # optional: `fedpeft client --site-config ...` runs the agent
    keygen = client.add_parser("keygen", help="make this site's node and audit key pairs (run at the site)",
                               description="Make the site's node key pair (Flower node authentication) and audit "
                                           "key pair (signs the site's audit log). Send only node.pub and "
                                           "audit.pub to the coordinator's operators; the .key files never leave "
                                           "the site.")
    keygen.add_argument("--out", required=True, help="directory for the keys: the site's bundle directory (site.toml "
                                                     "names node.key and audit.key beside it) or a key directory")
    keygen.add_argument("--force", action="store_true",
                        help="make new keys even if some exist (the old files are kept as *.retired-<time>)")
    keygen.add_argument("--node-key-only", action="store_true",
                        help="only a new node key pair (a rotation); keep the audit key that signs the existing log")
    p.add_argument("--site-config", help="the site's site.toml (required to run or --check the agent)")
    p.add_argument("--check", action="store_true",
                   help="only check the files, the keys (mode 0600), the policy and the connection to the "
                        "coordinator, then exit")
    p.add_argument("--attempts", type=int, default=None,
                   help="give up after this many retries while the coordinator is unreachable or does not accept "
                        "this site's key yet (default: keep trying)")


def _cmd_client(args: argparse.Namespace) -> int:
    from fedpeft.deploy.agent import check_site, load_site_settings, run_agent

    if args.client_command == "keygen":
        return _client_keygen(args)
    if not args.site_config:
        raise FedpeftError("give the site's settings: fedpeft client --site-config site.toml [--check]; to make the "
                           "site's keys first: fedpeft client keygen --out DIR")
    site = load_site_settings(args.site_config)
    if args.check:
        check_site(site)
        print(f"site '{site.name}': files, node and audit keys, policy and the TLS connection to {site.coordinator} "
              "are in order")
        return 0
    return run_agent(site, attempts=args.attempts)


def _client_keygen(args: argparse.Namespace) -> int:
    from fedpeft.audit.keys import key_id, load_public_key
    from fedpeft.deploy.pki import site_keygen
    from fedpeft.deploy.site_keys import AUDIT_PUB, NODE_PUB, node_fingerprint

    made = site_keygen(args.out, force=args.force, node_only=args.node_key_only)
    out = made.directory
    for path in made.retired:
        print(f"kept the old {path.name.split('.retired-')[0]} as {path}")
    print(f"site keys made in {out}")
    for path in made.private:
        print(f"  {path}  private (mode 0600): NEVER send it to anyone, the coordinator included; back it up")
    print("Send these public keys to the coordinator's operators (e-mail is fine), and read them the fingerprints "
          "over the phone so they know the files are yours:")
    node_line = (out / NODE_PUB).read_text(encoding="ascii").strip()
    print(f"  {out / NODE_PUB}  node key {node_fingerprint(node_line)}")
    if not args.node_key_only:
        audit = load_public_key(out / AUDIT_PUB)
        print(f"  {out / AUDIT_PUB}  audit key id {key_id(audit)} (also give it to your auditors)")
        print("The coordinator runs `fedpeft pki add-site NAME --public-key node.pub --audit-public-key audit.pub` "
              "and sends back ca.pem, site.toml and policy.toml: put them in this directory (site.toml's node_key "
              "and audit_key name the keys here), then run `fedpeft client --site-config site.toml --check`.")
    else:
        print("The coordinator runs `fedpeft pki rotate-site NAME --public-key node.pub` and restarts `fedpeft "
              "server`; then restart this site's agent.")
    return 0


def _audit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="verify audit logs offline and render a compliance report")
    audit = p.add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a log's chain, signatures, sequence and timestamps (exit 0 only "
                                             "for an intact log), or cross-check a site's log against the "
                                             "coordinator's")
    verify.add_argument("log", nargs="?", help="an audit log (JSON lines)")
    verify.add_argument("--pubkey", help="the writer's trusted public key (base64, or its .pub file)")
    verify.add_argument("--site", help="a site's audit log, to cross-check against --server")
    verify.add_argument("--server", help="the coordinator's audit log")
    verify.add_argument("--site-pubkey", help="the site's trusted public key")
    verify.add_argument("--server-pubkey", help="the coordinator's trusted public key")
    report = audit.add_parser("report", help="a self-contained report of a run from the coordinator's log")
    report.add_argument("log", help="the coordinator's audit log")
    report.add_argument("--out", required=True, help="file to write (report.html or report.md)")
    report.add_argument("--format", choices=("html", "md"), default="html")
    report.add_argument("--pubkey", help="the coordinator's trusted public key")
    report.add_argument("--site-log", action="append", default=[], metavar="SITE_LOG[:SITE_PUBKEY]",
                        help="a site's log to verify and cross-check, with the site's own trusted public key after a "
                             "colon (its audit .pub file, or base64) to check the log's authorship (repeatable)")


def _public_key(value: str | None, option: str) -> str | None:
    """The base64 Ed25519 key given as ``option`` (text, or a .pub file); AuditError for anything else."""
    from pathlib import Path

    from fedpeft.audit.keys import load_public_key
    from fedpeft.errors import AuditError

    if not value:
        return None
    fix = "pass the writer's audit .pub file (written next to its audit.key) or its base64 text"
    candidate = Path(value).expanduser()
    if candidate.is_dir():
        raise AuditError(f"{option} '{value}' is a directory, not a public key; {fix}")
    if candidate.is_file():
        try:
            data = candidate.read_bytes()
        except OSError as err:
            raise AuditError(f"{option} '{value}' cannot be read ({err.strerror}); {fix}") from None
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise AuditError(f"{option} '{value}' is a binary file, not a public key (a private key or a DER file?); "
                             f"{fix}") from None
        if "PRIVATE KEY" in text:
            raise AuditError(f"{option} '{value}' is a private key, not the public key (keep it secret); {fix}")
        try:
            return load_public_key(text)
        except AuditError:
            raise AuditError(f"{option} '{value}' does not hold a base64 Ed25519 public key (32 bytes); "
                             f"{fix}") from None
    try:
        return load_public_key(value)
    except AuditError:
        looks_like_path = any(ch in value for ch in "/\\") or value.endswith((".pub", ".key", ".pem"))
        problem = "does not exist" if looks_like_path else "is neither a file nor a base64 Ed25519 public key"
        raise AuditError(f"{option} '{value}' {problem}; {fix}") from None


def _audit_log(path: str, what: str) -> str:
    """An existing, readable log file; AuditError naming it otherwise."""
    from pathlib import Path

    from fedpeft.errors import AuditError

    file = Path(path).expanduser()
    where = "the coordinator writes <run dir>/audit/coordinator.jsonl; a site, its audit_log (site.toml)"
    if not file.exists():
        raise AuditError(f"{what} '{path}' does not exist; check the path ({where})")
    if not file.is_file():
        raise AuditError(f"{what} '{path}' is not a file; pass the log file itself ({where})")
    try:
        with file.open("rb"):
            pass
    except OSError as err:
        raise AuditError(f"{what} '{path}' cannot be read ({err.strerror}); check its permissions") from None
    return str(file)


def _report_out(path: str) -> str:
    """Where the report goes: a file path whose directory exists or can be made; AuditError otherwise."""
    from pathlib import Path

    from fedpeft.errors import AuditError

    out = Path(path).expanduser()
    if out.is_dir():
        raise AuditError(f"--out '{path}' is a directory; give the report's file name, e.g. {out / 'report.html'}")
    blocker = next((parent for parent in reversed(out.parents) if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise AuditError(f"--out '{path}': '{blocker}' is a file, not a directory, so the report cannot be written "
                         "there; choose another --out")
    return str(out)


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_command == "report":
        return _audit_report(args)
    if args.site or args.server:
        if not (args.site and args.server):
            raise FedpeftError("a cross-check needs both --site SITE_LOG and --server SERVER_LOG")
        from fedpeft.audit.crosscheck import cross_check

        site_log = _audit_log(args.site, "site audit log (--site)")
        server_log = _audit_log(args.server, "coordinator audit log (--server)")
        result = cross_check(site_log, server_log, _public_key(args.site_pubkey, "--site-pubkey"),
                             _public_key(args.server_pubkey, "--server-pubkey"))
        for finding in result.findings:
            print(finding)
        print(result.summary())
        return 0 if result.ok else 1
    if not args.log:
        raise FedpeftError("give the log to verify: fedpeft audit verify LOG [--pubkey KEY]")
    from fedpeft.audit.verify import verify_log

    verification = verify_log(_audit_log(args.log, "audit log"), _public_key(args.pubkey, "--pubkey"))
    print(verification.summary())
    return 0 if verification.intact else 1


def _site_log_and_key(value: str) -> tuple[str, str | None]:
    """``SITE_LOG`` or ``SITE_LOG:SITE_PUBKEY``: a base64 key has no colon, so the last colon splits them; a log
    whose own path holds a colon is taken whole when it exists."""
    from pathlib import Path

    path, colon, key = value.rpartition(":")
    if not colon or not path or not key or Path(value).expanduser().exists():
        return _audit_log(value, "site audit log (--site-log)"), None
    return (_audit_log(path, "site audit log (--site-log)"),
            _public_key(key, f"the key in --site-log '{value}' (after the colon)"))


def _audit_report(args: argparse.Namespace) -> int:
    """Write the report whatever the logs' state (it shows the damage), and exit 1 unless the coordinator's log is
    intact and every site log given verifies and cross-checks: a report of a damaged log is evidence, not a clean
    bill. Logs whose authorship no given key checked are named on stderr (exit 0: the chain is intact)."""
    from pathlib import Path

    from fedpeft.audit.report import SiteLog, write_report

    log, key = _audit_log(args.log, "coordinator audit log"), _public_key(args.pubkey, "--pubkey")
    site_logs = [SiteLog(Path(path), site_key) for path, site_key in map(_site_log_and_key, args.site_log)]
    report = write_report(log, _report_out(args.out), fmt=args.format, public_key=key, site_logs=site_logs)
    print(f"report written to {report.path}")
    for problem in report.verdict.problems:
        print(f"fedpeft: audit report: {problem}", file=sys.stderr)
    if report.verdict.unchecked and not report.verdict.problems:
        print(f"fedpeft: audit report: chain intact, authorship not checked for: "
              f"{'; '.join(report.verdict.unchecked)}", file=sys.stderr)
    return 1 if report.verdict.problems else 0


def _load_config(path: str | None, overrides: dict[str, object]):
    from fedpeft.composition import from_mapping, load_toml
    from fedpeft.config import RunConfig, unflatten

    if path:
        return load_toml(path, overrides)
    return from_mapping(unflatten(overrides), origin="command line") if overrides else RunConfig()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fedpeft {version('fedpeft')}"
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "fedpeft (version unknown: not installed; install it with pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _export_parser(sub)
    _predict_parsers(sub)
    _pki_parser(sub)
    _server_parser(sub)
    _client_parser(sub)
    _audit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"simulate": _cmd_simulate, "export": _cmd_export, "predict": _cmd_predict,
                    "evaluate": _cmd_predict, "pki": _cmd_pki, "server": _cmd_server,
                    "client": _cmd_client, "audit": _cmd_audit}
        return commands[args.command](args)
    except FedpeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path no check above foresaw: still a message, never a traceback
        where = f" ('{err.filename}')" if err.filename else ""
        print(f"fedpeft: error: {err.strerror or err}{where}; check the path and its permissions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
