"""The `fedpeft` command: one entry with sub-commands (simulate, export, pki, server, client, audit)."""

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
    "federation.secure_aggregation": True, "federation.aggregation": "server-sgd", "federation.rounds": 200,
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fedpeft.simulations.engine import simulate

    print_result(simulate(cfg, verbose=args.verbose, resume=args.resume, cpus_per_site=args.cpus_per_site,
                          gpus_per_site=args.gpus_per_site, ray_address=args.ray_address))
    return 0


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's global adapter (optionally merged into the base) for serving")
    p.add_argument("run_dir", help="the run directory, e.g. runs/quickstart")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--round", type=int, default=None, help="which round's adapter (default: the latest)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into a full-precision copy of the base and save the whole model")


def _cmd_export(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedpeft.runs.export import export_run

    out = export_run(args.run_dir, args.out, args.round, args.merge)
    print(f"exported {'merged model' if args.merge else 'adapter'} to {out}")
    return 0


def _pki_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pki", help="the federation's certificates and site keys")
    pki = p.add_subparsers(dest="pki_command", required=True)
    init = pki.add_parser("init", help="create the CA and the coordinator's TLS certificate")
    init.add_argument("--dir", required=True, help="PKI directory to create (keep it with the coordinator)")
    init.add_argument("--host", action="append", default=[], required=True,
                      help="a host name or IP the coordinator serves (repeatable)")
    site = pki.add_parser("add-site", help="create a site's node key pair and the bundle for its IT team")
    site.add_argument("name", help="the site's name (letters, digits, '.', '_', '-')")
    site.add_argument("--dir", required=True, help="the PKI directory made by `fedpeft pki init`")
    site.add_argument("--coordinator", required=True, help="host:port the site's agent dials out to")
    rotate = pki.add_parser("rotate-site", help="give a site a new node key (the coordinator swaps it at its next "
                                                "start)")
    rotate.add_argument("name")
    rotate.add_argument("--dir", required=True, help="the PKI directory")
    remove = pki.add_parser("remove-site", help="take a site out of the federation (the coordinator unregisters "
                                                "its key at its next start)")
    remove.add_argument("name")
    remove.add_argument("--dir", required=True, help="the PKI directory")


def _cmd_pki(args: argparse.Namespace) -> int:
    from fedpeft.deploy.pki import add_site, init_pki, remove_site, rotate_site

    if args.pki_command == "rotate-site":
        bundle = rotate_site(args.dir, args.name)
        print(f"site '{args.name}': new node key in {bundle.directory} (old pair kept as *.retired-*); hand node.key "
              "to the site's IT team and restart `fedpeft server` to swap the registered key")
    elif args.pki_command == "remove-site":
        moved = remove_site(args.dir, args.name)
        print(f"site '{args.name}' removed (bundle moved to {moved}); `fedpeft server` unregisters its key at its "
              "next start")
    elif args.pki_command == "init":
        directory = init_pki(args.dir, args.host)
        print(f"created the CA and the coordinator certificate for {', '.join(args.host)} in {directory} "
              "(private keys: ca.key, server.key, mode 0600)")
    else:
        bundle = add_site(args.dir, args.name, args.coordinator)
        print(f"site '{args.name}': bundle in {bundle.directory}; register its public key {bundle.public_key} "
              "with the coordinator (see docs/deployment.md)")
    return 0


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

    cfg = _load_config(args.config, _parse_overrides(args.overrides))
    cfg = replace(cfg, run=replace(cfg.run, out_dir=str(Path(cfg.run.out_dir).expanduser().resolve())))
    if not cfg.run.audit_key and (Path(args.pki) / "audit.key").is_file():  # the coordinator's own audit key
        cfg = replace(cfg, run=replace(cfg.run, audit_key=str((Path(args.pki) / "audit.key").resolve())))
    settings = CoordinatorSettings(pki_dir=Path(args.pki), config=cfg, state_dir=Path(args.state_dir).resolve(),
                                   host=args.host, port=args.port, sites=tuple(args.site))
    status = Coordinator(settings).run()
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    print(f"run {status}; results in {run_dir}")
    return 0 if status == "finished:completed" else 1


def _client_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="run a site's agent: it dials out to the coordinator and trains locally",
                       description="Start this site's agent with the settings of its site.toml (from the bundle "
                                   "of `fedpeft pki add-site`).")
    p.add_argument("--site-config", required=True, help="the site's site.toml")
    p.add_argument("--check", action="store_true",
                   help="only check the files, the key and the connection to the coordinator, then exit")
    p.add_argument("--attempts", type=int, default=None,
                   help="give up after this many retries while the coordinator is unreachable or does not accept "
                        "this site's key yet (default: keep trying)")


def _cmd_client(args: argparse.Namespace) -> int:
    from fedpeft.deploy.agent import check_site, load_site_settings, run_agent

    site = load_site_settings(args.site_config)
    if args.check:
        check_site(site)
        print(f"site '{site.name}': files, node key and the TLS connection to {site.coordinator} are in order")
        return 0
    return run_agent(site, attempts=args.attempts)


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
    report.add_argument("--site-log", action="append", default=[], help="a site's log to cross-check (repeatable)")


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedpeft.audit.keys import load_public_key

    def key(value: str | None) -> str | None:
        return load_public_key(value) if value else None

    if args.audit_command == "report":
        from fedpeft.audit.report import render_report

        out = render_report(args.log, args.out, fmt=args.format, public_key=key(args.pubkey),
                            site_logs=args.site_log)
        print(f"report written to {out}")
        return 0
    if args.site or args.server:
        if not (args.site and args.server):
            raise FedpeftError("a cross-check needs both --site SITE_LOG and --server SERVER_LOG")
        from fedpeft.audit.crosscheck import cross_check

        result = cross_check(args.site, args.server, key(args.site_pubkey), key(args.server_pubkey))
        for finding in result.findings:
            print(finding)
        print(result.summary())
        return 0 if result.ok else 1
    if not args.log:
        raise FedpeftError("give the log to verify: fedpeft audit verify LOG [--pubkey KEY]")
    from fedpeft.audit.verify import verify_log

    verification = verify_log(args.log, key(args.pubkey))
    print(verification.summary())
    return 0 if verification.intact else 1


def _load_config(path: str | None, overrides: dict[str, object]):
    from fedpeft.composition import from_mapping, load_toml
    from fedpeft.config import RunConfig, unflatten

    if path:
        return load_toml(path, overrides)
    return from_mapping(unflatten(overrides), origin="command line") if overrides else RunConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _export_parser(sub)
    _pki_parser(sub)
    _server_parser(sub)
    _client_parser(sub)
    _audit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"simulate": _cmd_simulate, "export": _cmd_export, "pki": _cmd_pki, "server": _cmd_server,
                    "client": _cmd_client, "audit": _cmd_audit}
        return commands[args.command](args)
    except FedpeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
