"""`fedpeft simulate`, `export`, `predict` and `evaluate`: running a federation and using its model."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fedpeft.cli.common import _config_arguments, _directory_for, _load_config, _parse_overrides, _trained_or_why, _warn

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
    _config_arguments(p, config_help="TOML run config (sections [model] [peft] [train] [federation] [data] [run])",
                      set_example=" (e.g. --set federation.rounds=3)")
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
