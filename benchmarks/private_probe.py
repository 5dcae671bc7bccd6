"""Private and useful (issue #17): distributed example-level DP with secure aggregation against every site alone and
the pooled non-private model, on real data and one common test set.

    python benchmarks/private_probe.py --dataset banking77 --epsilons 1,4,8 --results benchmarks/results/probe.jsonl
    python benchmarks/private_probe.py --dataset medical-abstracts --epsilons 1,4,8 --results ...
    python benchmarks/private_probe.py --data-dir DIR --max-train 300 --max-test 100 --sites 3 --rounds 6 \
        --epsilons 8 --max-length 16 --model tiny-llama        # smoke size (tests/benchmarks)

What runs (every number on the dataset's common test set; features of the frozen MiniLM, mean-pooled, normalised):
  pooled    the linear probe trained without DP on all sites' training rows together (the non-private ceiling)
  alone     each site trains the same probe, without DP, on its own rows only (a site keeps its data: no DP needed)
  ddp<eps>  fedpeft simulate: peft.method = probe, privacy.dp_mode = distributed (one DP step per round, Skellam
            noise shares), secure aggregation, server-sgd; each site's ledger accounts epsilon <eps> (delta 1e-5)
Tuning: none on the test set. The DP rows use fedpeft's defaults: full batch (q = 1 unless --sample-rate), clip 1,
momentum 0.9, and with --rounds auto (the default) the rounds and the server's learning rate that
``fedpeft.privacy.defaults`` derives from epsilon and the sites' training rows -- its constants were tuned on the
sites' held-out rows (validation carved from training data) by ``benchmarks/tune_private_probe.py``. The probes
without DP train in blocks of 10 epochs (SGD, momentum 0.9), the number of blocks chosen on the sites' held-out rows.
``--results FILE`` appends each finished row (JSONL, one line per row); a stopped comparison resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from real_data_sets import DATASETS, macro_f1, prepare, write_csv  # beside this script

from fedpeft.composition import from_mapping
from fedpeft.config import RunConfig
from fedpeft.data.sites import site_split
from fedpeft.io.atomic import append_jsonl
from fedpeft.models.loader import load_base_model
from fedpeft.privacy.defaults import ProbeSchedule, probe_schedule
from fedpeft.training import probe
from fedpeft.training.batches import encode_classification

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITES = {"banking77": 10, "medical-abstracts": 5}
DEFAULT_MAX_LENGTH = {"banking77": 64, "medical-abstracts": 256}
SCHEMA_VERSION = 1


@dataclass
class Row:
    name: str
    accuracy: float
    macro_f1: float
    epsilon: float | None = None
    seconds: float = 0.0
    rounds: int = 0
    upload_bytes_per_round: float | None = None
    site_accuracy: dict[str, float] | None = None  # alone: each site's own probe
    setup: str = ""


def scores(weight: Any, test: probe.Features) -> tuple[float, float]:
    preds = (test.x @ weight.T).argmax(-1).numpy()
    truth = test.labels.numpy()
    return float(np.mean(preds == truth)), macro_f1(truth, preds)


def run_config(args: argparse.Namespace, source: Path, labels: tuple[str, ...], out: str, epsilon: float | None,
               ) -> RunConfig:
    # Each epsilon is its own federation: a ledger per run, on purpose (the default would carry ε across runs).
    private = {"dp": True, "dp_mode": "distributed", "target_epsilon": epsilon, "sample_rate": args.sample_rate,
               "ledger_dir": str(Path(out) / "{run}" / "sites")}
    return from_mapping({
        "model": {"name": args.model, "max_length": args.max_length},
        "peft": {"method": "probe"},
        "train": {"local_epochs": args.local_epochs, "learning_rate": args.lr, "batch_size": 64},
        "strategy": {"server_learning_rate": learning_rate_for(args, epsilon)},
        "federation": {"rounds": rounds_for(args, epsilon), "num_sites": args.sites,
                       "secure_aggregation": epsilon is not None,
                       "aggregation": "server-sgd" if epsilon is not None else "fedavg",
                       "eval_every": max(1, rounds_for(args, epsilon) // 5)},
        "data": {"source": str(source), "label_names": list(labels), "partitioner": "dirichlet",
                 "dirichlet_alpha": args.alpha, "eval_fraction": args.eval_fraction,
                 "feature_cache": str(args.cache)},
        "secagg": {"max_weight": float(args.max_rows)},
        "privacy": private if epsilon is not None else {},
        "run": {"name": f"probe-eps{epsilon}", "out_dir": out, "seed": args.seed},
    })


def rounds_for(args: argparse.Namespace, epsilon: float | None) -> int:
    """--rounds: 'auto' (fedpeft.privacy.defaults from epsilon and the sites' rows), one number, or
    'eps:rounds' pairs (the largest epsilon at or below ``epsilon`` applies)."""
    if args.rounds == "auto":
        return _schedule(args, epsilon).rounds if epsilon is not None else 1
    if ":" not in args.rounds:
        return int(args.rounds)
    pairs = sorted((float(e), int(r)) for e, r in (item.split(":") for item in args.rounds.split(",")))
    eligible = [r for e, r in pairs if epsilon is None or e <= epsilon] or [pairs[0][1]]
    return eligible[-1]


def learning_rate_for(args: argparse.Namespace, epsilon: float | None) -> float:
    """The server's step: the derived one with --rounds auto, else server-sgd's default (4)."""
    return _schedule(args, epsilon).learning_rate if args.rounds == "auto" and epsilon is not None else 0.0


def _schedule(args: argparse.Namespace, epsilon: float) -> ProbeSchedule:
    return probe_schedule(target_epsilon=epsilon, total_rows=args.total_rows)


def features_of(data: Any, model: Any, tokenizer: Any, args: argparse.Namespace, fingerprint: str) -> probe.Features:
    """The same cache entries the simulated sites use (same base fingerprint, settings and encoded rows)."""
    encoded = encode_classification(data.texts, data.labels, tokenizer, args.max_length)
    return probe.cached_features(model, encoded, cache_dir=Path(args.cache), base_fingerprint=fingerprint,
                                 settings=probe.feature_settings(args.model, args.max_length, tokenizer))


def non_private(train: probe.Features, validation: probe.Features, test: probe.Features,
                args: argparse.Namespace) -> tuple[float, float]:
    """The probe without DP, trained in blocks of 10 epochs up to --epochs-alone; the block count is chosen on
    ``validation`` (held-out rows of the same training data), never on the test set."""
    import torch

    weight, best, best_accuracy = torch.zeros(args.classes, train.x.shape[1]), None, -1.0
    for block in range(max(1, args.epochs_alone // 10)):
        weight, _ = probe.train(weight, train, learning_rate=args.probe_lr, epochs=10, batch_size=64,
                                seed=args.seed + block)
        accuracy = probe.evaluate(weight, validation).accuracy
        if accuracy > best_accuracy:
            best, best_accuracy = weight.clone(), accuracy
    return scores(best, test)


def run_private(epsilon: float, cfg: RunConfig, test: probe.Features) -> Row:
    from safetensors.torch import load_file

    from fedpeft.simulations.engine import simulate
    from fedpeft.simulations.report import bytes_per_client

    print(f"--- ddp{epsilon:g}: distributed DP epsilon {epsilon:g} + secure aggregation ---", flush=True)
    started = time.monotonic()
    result = simulate(cfg)
    adapter = result.summary.get("final_adapter")
    if not adapter:
        raise RuntimeError(f"ddp{epsilon:g}: no round changed the global adapter ({result.run_dir})")
    weight = load_file(str(Path(adapter) / "adapter_model.safetensors"))["probe.weight"]
    accuracy, f1 = scores(weight, test)
    spent = result.summary.get("site_epsilon") or {}
    return Row(f"ddp{epsilon:g}", accuracy, f1, max(spent.values()) if spent else None,
               time.monotonic() - started, cfg.federation.rounds, bytes_per_client(result))


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(argv)
    train, test, how = prepare(args)
    args.classes = len(train.label_names)
    args.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.dataset]
    args.sites = args.sites or DEFAULT_SITES[args.dataset]
    done = load_rows(args.results, setup_key_of(args))
    with tempfile.TemporaryDirectory(prefix="fedpeft-probe-") as tmp:
        source = Path(tmp) / "train.csv"
        write_csv(train, source)
        args.max_rows = 10_000  # a bound on any site's rows; tightened from the actual split just below
        cfg = run_config(args, source, train.label_names, tmp, None)
        site_rows = [len(site_split(cfg, i, args.sites).train.texts) for i in range(args.sites)]
        args.max_rows, args.total_rows = max(site_rows), sum(site_rows)
        cfg = run_config(args, source, train.label_names, tmp, None)
        rows = baselines(args, cfg, train, test, done)
        model, tokenizer = load_base_model(cfg.model, args.classes)
        test_features = features_of(test, model, tokenizer, args, fingerprint_of(model))
        for epsilon in [float(e) for e in args.epsilons.split(",") if e]:
            name = f"ddp{epsilon:g}"
            row = done.get(name) or run_private(epsilon, run_config(args, source, train.label_names, tmp, epsilon),
                                                test_features)
            rows.append(keep(row, args, done, how))
    print_table(rows)
    if args.plot:
        plot(rows, args)
    return rows


def plot(rows: list[Row], args: argparse.Namespace) -> None:
    """Accuracy vs epsilon: distributed DP, every site alone (range and mean), the pooled non-private probe, and
    today's local-noise DP rows where --local-dp gives them (measured by benchmarks/real_data.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted((r.epsilon or 0.0, r.accuracy) for r in rows if r.name.startswith("ddp"))
    by_name = {r.name: r for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(*zip(*private, strict=True), "o-", label="federated, distributed DP + secure aggregation (probe)")
    if "pooled" in by_name:
        ax.axhline(by_name["pooled"].accuracy, color="k", ls="--", label="pooled data, no DP (probe)")
    alone = by_name.get("alone")
    if alone and alone.site_accuracy:
        values = list(alone.site_accuracy.values())
        ax.axhspan(min(values), max(values), color="tab:orange", alpha=0.2, label="each site alone, no DP (range)")
    if args.local_dp:
        local = sorted((float(e), float(a)) for e, a in (item.split(":") for item in args.local_dp.split(",")))
        ax.plot(*zip(*local, strict=True), "s:", color="tab:red", label="local-noise DP-SGD at each site (LoRA)")
    ax.set_xlabel("epsilon per site (delta 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.set_title(f"{args.dataset}: {args.sites} sites")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot -> {args.plot}")


def baselines(args: argparse.Namespace, cfg: RunConfig, train: Any, test: Any, done: dict[str, Row]) -> list[Row]:
    if "pooled" in done and "alone" in done:
        return [done["pooled"], done["alone"]]
    model, tokenizer = load_base_model(cfg.model, args.classes)
    fingerprint = fingerprint_of(model)
    test_features = features_of(test, model, tokenizer, args, fingerprint)
    per_site, f1s, pooled_parts = {}, [], []
    for site in range(args.sites):
        split = site_split(cfg, site, args.sites)
        own = features_of(split.train, model, tokenizer, args, fingerprint)
        held_out = features_of(split.eval, model, tokenizer, args, fingerprint)
        pooled_parts += [own, held_out]
        accuracy, f1 = non_private(own, held_out, test_features, args)
        per_site[str(site)] = accuracy
        f1s.append(f1)
    started = time.monotonic()  # the pooled model: every site's training part; validation: their held-out parts
    train_parts, held_parts = pooled_parts[0::2], pooled_parts[1::2]
    pooled = non_private(_cat(train_parts), _cat(held_parts), test_features, args)
    rows = [keep(Row("pooled", *pooled, seconds=time.monotonic() - started), args, done, "")]
    rows.append(keep(Row("alone", float(np.mean(list(per_site.values()))), float(np.mean(f1s)),
                         site_accuracy=per_site), args, done, ""))
    return rows


def _cat(parts: list[probe.Features]) -> probe.Features:
    import torch

    return probe.Features(torch.cat([p.x for p in parts]), torch.cat([p.labels for p in parts]))


def fingerprint_of(model: Any) -> str:
    """As a simulated site computes it (fedpeft.methods.probe): the whole base's weights."""
    from fedpeft.audit.payload import model_fingerprint

    return model_fingerprint(model)


def keep(row: Row, args: argparse.Namespace, done: dict[str, Row], how: str) -> Row:
    row.setup = setup_key(args)
    if args.results and row.name not in done:
        append_jsonl(Path(args.results), {"schema_version": SCHEMA_VERSION, **asdict(row)})
    print(f"{row.name:<8} accuracy {row.accuracy:.3f} macro-F1 {row.macro_f1:.3f}"
          + (f" epsilon {row.epsilon:.2f}" if row.epsilon is not None else "") + f" ({row.seconds:.0f} s)",
          flush=True)
    return row


def setup_key_of(args: argparse.Namespace) -> str:
    """The setup before the dataset defaults are filled in (what the command line says)."""
    filled = argparse.Namespace(**vars(args))
    filled.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.dataset]
    filled.sites = args.sites or DEFAULT_SITES[args.dataset]
    return setup_key(filled)


def setup_key(args: argparse.Namespace) -> str:
    return (f"{args.dataset} sites={args.sites} alpha={args.alpha} rounds={args.rounds} q={args.sample_rate or 1} "
            f"len={args.max_length} train={args.max_train or 'all'} test={args.max_test or 'all'} seed={args.seed} "
            f"model={args.model}")


def load_rows(path: str | None, setup: str) -> dict[str, Row]:
    """Rows already measured under the same setup (the last line of a name wins)."""
    if not path or not Path(path).is_file():
        return {}
    rows = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path} line {number} is not JSON ({err}); remove or repair that line") from None
        if data.pop("schema_version", 1) > SCHEMA_VERSION:
            raise SystemExit(f"{path} line {number}: written by a newer fedpeft; upgrade it or use another file")
        if data.get("setup") == setup:
            rows[data["name"]] = Row(**data)
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"\n{'setting':<8} {'accuracy':>8} {'macro-F1':>8} {'eps':>5} {'rounds':>6} {'KiB/site/round':>14} "
          f"{'wall s':>7}")
    for r in rows:
        kib = "-" if r.upload_bytes_per_round is None else f"{r.upload_bytes_per_round / 1024:,.1f}"
        eps = "-" if r.epsilon is None else f"{r.epsilon:.2f}"
        print(f"{r.name:<8} {r.accuracy:>8.3f} {r.macro_f1:>8.3f} {eps:>5} {r.rounds:>6} {kib:>14} {r.seconds:>7.1f}")
    alone = next((r for r in rows if r.name == "alone"), None)
    for r in rows:
        if r.name.startswith("ddp") and alone and alone.site_accuracy:
            better = sum(r.accuracy > acc for acc in alone.site_accuracy.values())
            print(f"{r.name}: better than {better} of {len(alone.site_accuracy)} sites alone "
                  f"(sites alone: {min(alone.site_accuracy.values()):.3f}..{max(alone.site_accuracy.values()):.3f})")


def add_site_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset, its split over the sites and the features: what ``run_config`` and ``prepare`` read (shared with
    benchmarks/tune_private_probe.py, which scores the same sites' rows)."""
    p.add_argument("--dataset", choices=DATASETS, default="banking77")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--sites", type=int)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--sample-rate", type=float, default=0.0, help="Poisson rate per round (0: 1, full batch)")
    p.add_argument("--lr", type=float, default=1e-3, help="unused by the DP rows (the server steps)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fedpeft-feature-cache"),
                   help="where features are cached (keyed by base, settings and data)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_site_arguments(p)
    p.add_argument("--rounds", default="auto",
                   help="DP rounds (one DP step each): 'auto' (derived from epsilon and the sites' rows, with the "
                        "server's learning rate: fedpeft.privacy.defaults), 'eps:rounds,...', or one number for all")
    p.add_argument("--epsilons", default="1,4,8")
    p.add_argument("--probe-lr", type=float, default=0.5, help="the non-private probes' SGD rate")
    p.add_argument("--epochs-alone", type=int, default=200,
                   help="at most this many epochs for the non-private probes (chosen on held-out rows)")
    p.add_argument("--results", help="append-only JSONL of finished rows (resume)")
    p.add_argument("--plot", help="write a PNG: accuracy vs epsilon")
    p.add_argument("--local-dp", help="'eps:accuracy,...' of local-noise DP rows to draw (from RESULTS.md)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
