"""`fedpeft pki`, `server` and `client`: the federation's keys, the coordinator and a site's agent."""

from __future__ import annotations

import argparse
import sys

from fedpeft.cli.common import _config_arguments, _directory_for, _load_config, _parse_overrides, _trained_or_why, _warn
from fedpeft.errors import FedpeftError


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
    _config_arguments(p, config_help="TOML run config (as for `fedpeft simulate`)", set_example="")
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
