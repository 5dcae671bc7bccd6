"""Utility of federated, private and secure LoRA fine-tuning on real data (issue #9), against centralized LoRA on the
pooled data and local-only training, every method scored on the same held-out test set.

    python benchmarks/real_data.py                                # banking77: 10 banks, Dirichlet a=0.5, all settings
    python benchmarks/real_data.py --dataset medical-abstracts    # 5 hospitals over an 80/20 grouped split
    python benchmarks/real_data.py --max-length 32 --settings dp8-secure,fedit,centralized --dp-batch-size 128 \
        --dp-lr 5e-3 --threads 1 --plot benchmarks/real_data_banking77_full.png   # all rows: ~40 min on 2 cores
    python benchmarks/real_data.py --data-dir DIR --sites 2 --rounds 1 --max-train 60 --max-test 30 \
        --max-length 16 --settings fedit,centralized              # smoke size (tests/benchmarks/test_real_data.py)

Data (read, never copied): ``--data-dir`` (default: the ``shared/data`` folder beside the repository).
- banking77: train.csv -> the banks, test.csv -> the common test set (categories.json fixes the 77 class ids).
- medical-abstracts: medical_tc_test.csv; identical texts are grouped, a text seen under more than one label
  (multi-label) is dropped, one row is kept per remaining text, and the unique texts are split 80/20 (numpy seed 0,
  first int(0.8 n) of a permutation to train), so no abstract is in both parts: 2125 train / 532 test.
The train part is written to a temporary CSV (outside the repository) that ``data.source`` points at; fedpeft's own
partitioner splits it over the sites (Dirichlet label skew, alpha 0.5 by default; ``--partitioner iid``), and each
site holds out ``--eval-fraction`` of its rows for the per-round held-out accuracy in metrics.jsonl.

Settings (``--settings``, comma-separated; default all):
  centralized   one model on the pooled training rows of all sites, rounds x local-epochs epochs (train_local)
  local         each site alone on its own training rows, same epochs; mean over the sites
  fedit ffa     FedAvg with peft.lora_mode fedit (A and B averaged) / ffa (FFA-LoRA: A frozen, B travels)
  fedadam       FedAdam (server Adam over the FedAvg update), lora_mode fedit
  dp1 dp4 dp8   FedAvg + example-level DP-SGD at every site, epsilon 1 / 4 / 8, delta 1e-5 (--dp-lora-mode,
                --dp-batch-size = expected Poisson batch, --dp-lr)
  secure        FedAvg (fedit) with SecAgg+ secure aggregation
  dp8-secure    the headline: FedAvg + DP epsilon 8 + secure aggregation
Each federated run's final global adapter is loaded from its run directory onto a freshly loaded base (fedpeft's
load_saved_adapter, i.e. peft's PeftModel.from_pretrained for LoRA) and scored on the common test set: accuracy and
macro-F1. "wall s" is the training wall time (a federation: the whole simulation, Ray's start and the per-round
site evaluations included; local: all sites one after another). Upload bytes are from metrics.jsonl (under SecAgg+
the masked vector only; the key and share messages are not counted).
Prints a table and ends with a one-line summary: headline accuracy / centralized accuracy (goal >= 0.95x).
``--results FILE`` keeps each finished setting in an append-only JSONL (benchmarks/real_data_results.py): a long
comparison that is stopped resumes where it was, and settings measured in separate invocations under the same setup
come together in one table and plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from real_data_results import append_row, load_rows, setup_of  # beside this script
from real_data_sets import DATASETS, macro_f1, prepare, write_csv

from fedpeft.composition import from_mapping
from fedpeft.config import RunConfig
from fedpeft.data.records import ClassificationData
from fedpeft.training.trainer import predict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DEFAULT_SITES = {"banking77": 10, "medical-abstracts": 5}
DEFAULT_MAX_LENGTH = {"banking77": 64, "medical-abstracts": 256}  # as in shared/REFERENCE.md
HEADLINE = "dp8-secure"


@dataclass(frozen=True)
class Setting:
    kind: str  # centralized | local | fed
    what: str
    aggregation: str = "fedavg"
    lora_mode: str = "fedit"  # for DP rows replaced by --dp-lora-mode
    epsilon: float | None = None
    secure: bool = False


SETTINGS: dict[str, Setting] = {
    "centralized": Setting("centralized", "pooled data, one model"),
    "local": Setting("local", "each site alone (mean)"),
    "fedit": Setting("fed", "FedAvg, LoRA fedit"),
    "ffa": Setting("fed", "FedAvg, FFA-LoRA", lora_mode="ffa"),
    "fedadam": Setting("fed", "FedAdam, LoRA fedit", aggregation="fedadam"),
    "dp1": Setting("fed", "FedAvg + DP eps=1", epsilon=1.0),
    "dp4": Setting("fed", "FedAvg + DP eps=4", epsilon=4.0),
    "dp8": Setting("fed", "FedAvg + DP eps=8", epsilon=8.0),
    "secure": Setting("fed", "FedAvg + SecAgg+", secure=True),
    HEADLINE: Setting("fed", "FedAvg + DP eps=8 + SecAgg+", epsilon=8.0, secure=True),
}


@dataclass
class Row:
    name: str
    what: str
    accuracy: float
    macro_f1: float
    seconds: float
    bytes_per_round: float | None = None  # per client per round; None: nothing travels
    epsilon: float | None = None  # the largest site's cumulative epsilon
    note: str = ""
    curve: list[float] = field(default_factory=list)  # held-out (site eval split) accuracy by round, from metrics


# ---- scoring --------------------------------------------------------------------------------------------------------

def score(model: Any, test: Any, batch_size: int) -> tuple[float, float]:
    preds, truth = predict(model, test, batch_size).numpy(), test.labels.numpy()
    return float(np.mean(preds == truth)), macro_f1(truth, preds)


# ---- configs and runs -----------------------------------------------------------------------------------------------

def run_config(args: argparse.Namespace, name: str, source: Path, labels: tuple[str, ...], out: str) -> RunConfig:
    setting = SETTINGS[name]
    dp = setting.epsilon is not None
    return from_mapping({
        "model": {"name": args.model, "max_length": args.max_length},
        "peft": {"lora_mode": args.dp_lora_mode if dp else setting.lora_mode},
        "train": {"local_epochs": args.local_epochs, "batch_size": args.dp_batch_size if dp else args.batch_size,
                  "learning_rate": args.dp_lr if dp else args.lr, **head_rate(args, dp)},
        "federation": {"rounds": args.rounds, "num_sites": args.sites, "aggregation": setting.aggregation,
                       "secure_aggregation": setting.secure},
        "data": {"source": str(source), "text_column": "text", "label_column": "label", "label_names": list(labels),
                 "partitioner": args.partitioner, "dirichlet_alpha": args.alpha, "eval_fraction": args.eval_fraction},
        # each setting is its own federation: a ledger per run, on purpose (the default carries ε across runs)
        "privacy": {"dp": dp, "target_epsilon": setting.epsilon or 8.0, "delta": 1e-5,
                    "ledger_dir": str(Path(out) / "{run}" / "sites")},
        "run": {"name": f"{args.dataset}-{name}", "out_dir": out, "seed": args.seed},
    }, origin=f"setting {name}")


def head_rate(args: argparse.Namespace, dp: bool) -> dict[str, float]:
    """The task head's rate for DP rows when --dp-head-lr is given; otherwise fedpeft's default."""
    return {"head_learning_rate": args.dp_head_lr} if dp and args.dp_head_lr is not None else {}


def fresh_model(cfg: RunConfig) -> tuple[Any, Any]:
    """A site's starting point: the base from fedpeft's loader wrapped with the run's seeded adapter."""
    from fedpeft.data.sites import num_labels
    from fedpeft.methods import wrap_with_peft
    from fedpeft.models.loader import load_base_model

    base, tokenizer = load_base_model(cfg.model, num_labels(cfg))
    return wrap_with_peft(base, cfg.peft, cfg.model.task, cfg.run.seed), tokenizer


def site_train_sets(cfg: RunConfig) -> list[ClassificationData]:
    """Each site's training rows, exactly as fedpeft's partitioner gives them to the federation."""
    from fedpeft.data.sites import site_split

    return [site_split(cfg, pid, cfg.federation.num_sites).train for pid in range(cfg.federation.num_sites)]


def encode(data: ClassificationData, tokenizer: Any, max_length: int) -> Any:
    from fedpeft.training.batches import encode_classification

    return encode_classification(data.texts, data.labels, tokenizer, max_length)


def train_epochs(cfg: RunConfig) -> Any:
    """What one model trains for outside the federation: as many epochs as a site trains over all rounds."""
    return replace(cfg.train, local_epochs=cfg.federation.rounds * cfg.train.local_epochs)


def run_centralized(cfg: RunConfig, test: Any) -> Row:
    from fedpeft.training.trainer import train_local

    sites = site_train_sets(cfg)
    pooled = ClassificationData(tuple(t for s in sites for t in s.texts), tuple(y for s in sites for y in s.labels),
                                sites[0].label_names)
    model, tokenizer = fresh_model(cfg)
    started = time.monotonic()
    train_local(model, encode(pooled, tokenizer, cfg.model.max_length), train_epochs(cfg), cfg.model.task,
                seed=cfg.run.seed)
    seconds = time.monotonic() - started
    accuracy, f1 = score(model, test, cfg.train.eval_batch_size)
    return Row("centralized", SETTINGS["centralized"].what, accuracy, f1, seconds,
               note=f"{len(pooled)} rows, {train_epochs(cfg).local_epochs} epochs")


def run_local(cfg: RunConfig, test: Any) -> Row:
    from fedpeft.models.adapter_state import get_adapter_state, set_adapter_state
    from fedpeft.training.trainer import train_local

    model, tokenizer = fresh_model(cfg)
    start = get_adapter_state(model)
    scores, seconds = [], 0.0
    for pid, site in enumerate(site_train_sets(cfg)):
        set_adapter_state(model, start, source="the seeded initial adapter")
        started = time.monotonic()
        train_local(model, encode(site, tokenizer, cfg.model.max_length), train_epochs(cfg), cfg.model.task,
                    seed=cfg.run.seed + pid)
        seconds += time.monotonic() - started
        scores.append(score(model, test, cfg.train.eval_batch_size))
    acc = [a for a, _ in scores]
    return Row("local", SETTINGS["local"].what, float(np.mean(acc)), float(np.mean([f for _, f in scores])), seconds,
               bytes_per_round=0.0, note=f"{len(acc)} sites, accuracy {min(acc):.3f}..{max(acc):.3f}")


def adapter_scores(cfg: RunConfig, adapter_dir: Path, test: Any) -> tuple[float, float]:
    """The saved global adapter, loaded onto a freshly loaded base (fedpeft's load_saved_adapter: peft's
    PeftModel.from_pretrained for LoRA), on the common test set."""
    from fedpeft.data.sites import num_labels
    from fedpeft.methods import load_saved_adapter
    from fedpeft.models.loader import load_base_model

    base, _ = load_base_model(cfg.model, num_labels(cfg))
    return score(load_saved_adapter(base, adapter_dir), test, cfg.train.eval_batch_size)


def run_federated(cfg: RunConfig, name: str, test: Any) -> Row:
    from fedpeft.runs.run_dir import METRICS_FILE
    from fedpeft.simulations.engine import simulate
    from fedpeft.simulations.report import bytes_per_client

    print(f"--- {name}: {SETTINGS[name].what} ---", flush=True)
    result = simulate(cfg)
    if not result.summary.get("final_adapter"):
        raise RuntimeError(f"setting {name}: no round changed the global adapter ({result.run_dir})")
    accuracy, f1 = adapter_scores(cfg, Path(result.summary["final_adapter"]), test)
    records = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()]
    curve = [float(r["global_accuracy"]) for r in records]
    spent = result.summary.get("site_epsilon") or {}
    return Row(name, SETTINGS[name].what + ("" if cfg.peft.lora_mode == SETTINGS[name].lora_mode else
                                            f" ({cfg.peft.lora_mode})"),
               accuracy, f1, result.seconds, bytes_per_client(result), max(spent.values()) if spent else None,
               note=f"held-out acc by round {curve[0]:.3f} -> {curve[-1]:.3f}; {result.run_dir.name}", curve=curve)


# ---- output ---------------------------------------------------------------------------------------------------------

def print_table(rows: list[Row]) -> None:
    print(f"{'setting':<12} {'what':<32} {'accuracy':>8} {'macro-F1':>8} {'KiB/client/rnd':>14} {'eps':>5} "
          f"{'wall s':>7}  note")
    for r in rows:
        kib = "-" if r.bytes_per_round is None else f"{r.bytes_per_round / 1024:,.1f}"
        eps = "-" if r.epsilon is None else f"{r.epsilon:.2f}"
        print(f"{r.name:<12} {r.what:<32} {r.accuracy:>8.3f} {r.macro_f1:>8.3f} {kib:>14} {eps:>5} "
              f"{r.seconds:>7.1f}  {r.note}")


def summary_line(rows: list[Row], args: argparse.Namespace) -> str:
    by_name = {r.name: r for r in rows}
    federated = [r for r in rows if SETTINGS[r.name].kind == "fed"]
    head = by_name.get(HEADLINE) or (federated[0] if federated else rows[0])
    setup = (f"{args.dataset}, {args.sites} sites, {args.rounds} rounds x {args.local_epochs} local epoch(s), "
             f"{args.max_train or 'all'} train / {args.max_test or 'all'} test rows, max length {args.max_length}")
    if "centralized" not in by_name:
        return f"summary: {head.name} accuracy {head.accuracy:.3f} (no centralized row to compare; {setup})"
    base = by_name["centralized"]
    return (f"summary: {head.name} / centralized accuracy = {head.accuracy / base.accuracy:.2f}x "
            f"({head.accuracy:.3f} vs {base.accuracy:.3f}; issue #9 goal >= 0.95x on banking77; {setup})")


def plot(rows: list[Row], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for secure, style, label in ((False, "o-", "DP"), (True, "s", "DP + SecAgg+")):
        points = sorted((SETTINGS[r.name].epsilon, r.accuracy) for r in rows
                        if SETTINGS[r.name].epsilon is not None and SETTINGS[r.name].secure == secure)
        if points:
            left.plot(*zip(*points, strict=True), style, label=label)
    lines = {"centralized": ("--", "k"), "fedit": (":", "b"), "ffa": (":", "g"), "secure": (":", "m"),
             "local": ("-.", "r")}
    for r in rows:
        if r.name in lines:
            left.axhline(r.accuracy, linestyle=lines[r.name][0], color=lines[r.name][1], label=f"{r.name} (no DP)")
    left.set_xlim(0, 9)
    left.set(xlabel="epsilon per site (delta 1e-5)", ylabel="test accuracy", title="accuracy vs epsilon")
    left.legend(fontsize=8)
    for r in rows:
        if r.curve:
            right.plot(range(len(r.curve)), r.curve, marker=".", label=r.name)
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set(xlabel="round", ylabel="held-out accuracy (sites' eval splits)", title="global adapter by round")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="banking77")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder holding <dataset>/ (default %(default)s)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    p.add_argument("--model", default="minilm")
    p.add_argument("--sites", type=int, help="default: 10 banks / 5 hospitals")
    p.add_argument("--partitioner", choices=("dirichlet", "iid"), default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dp-batch-size", type=int, default=64, help="expected (Poisson) batch of the DP rows")
    p.add_argument("--dp-lr", type=float, default=2e-3)
    p.add_argument("--dp-head-lr", type=float, help="the classification head's rate in the DP rows (default: "
                                                     "fedpeft's train.head_learning_rate)")
    p.add_argument("--dp-lora-mode", choices=("fedit", "ffa"), default="ffa")
    p.add_argument("--max-train", type=int, default=0, help="stratified subsample of the training split; 0: all")
    p.add_argument("--max-test", type=int, default=0, help="stratified subsample of the test set; 0: all")
    p.add_argument("--max-length", type=int, help="default: 64 banking77, 256 medical-abstracts")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="each site's held-out share (per-round metrics)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of this process (centralized, local, scoring); 0: torch's default. On a "
                        "shared CPU 1 can be faster (Ray gives each simulated site's actor 1 CPU)")
    p.add_argument("--out", help="where run directories go (default: a temporary directory, removed afterwards)")
    p.add_argument("--plot", help="write a PNG: accuracy vs epsilon (DP rows) and accuracy by round")
    p.add_argument("--results", help="append-only JSONL of finished settings: each is appended as it finishes, and "
                                     "a setting already in the file under the same setup is reused, not run again")
    args = p.parse_args(argv)
    args.sites = args.sites or DEFAULT_SITES[args.dataset]
    args.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.dataset]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown or not args.settings:
        p.error(f"--settings: unknown {unknown}; use a comma list of {', '.join(SETTINGS)}")
    return args


def describe(args: argparse.Namespace, how: str, train: ClassificationData, test: ClassificationData) -> str:
    majority = int(np.argmax(train.label_counts()))
    baseline = float(np.mean(np.asarray(test.labels) == majority))
    split = f"dirichlet alpha={args.alpha}" if args.partitioner == "dirichlet" else "iid"
    return (f"\n{args.dataset}: {how}\n{args.sites} sites ({split}), {args.rounds} rounds x {args.local_epochs} "
            f"local epoch(s); {args.model} + LoRA r=8; max length {args.max_length}; majority-class test accuracy "
            f"{baseline:.3f}")


@contextlib.contextmanager
def workspace(out: str | None) -> Iterator[tuple[Path, str]]:
    """(temporary folder for the prepared CSV, folder for run directories)."""
    with tempfile.TemporaryDirectory(prefix="fedpeft-real-data-") as tmp:
        runs = out or str(Path(tmp) / "runs")
        Path(runs).mkdir(parents=True, exist_ok=True)
        yield Path(tmp), runs


def run_setting(args: argparse.Namespace, name: str, source: Path, labels: tuple[str, ...], out: str,
                test: Any) -> Row:
    cfg = run_config(args, name, source, labels, out)
    if SETTINGS[name].kind == "centralized":
        return run_centralized(cfg, test)
    if SETTINGS[name].kind == "local":
        return run_local(cfg, test)
    return run_federated(cfg, name, test)


def earlier_rows(args: argparse.Namespace) -> dict[str, Row]:
    """The settings ``--results`` already holds for this exact setup (they are not run again)."""
    if not args.results:
        return {}
    found = load_rows(Path(args.results), setup_of(args))
    reused = {name: Row(**found[name][0]) for name in args.settings if name in found}
    for name in reused:
        print(f"{name}: reusing the row measured {found[name][1]} ({args.results})", flush=True)
    return reused


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    reused = earlier_rows(args)
    train, test, how = prepare(args)
    with workspace(args.out) as (tmp, out):
        source = tmp / f"{args.dataset}-train.csv"
        write_csv(train, source)
        _, tokenizer = fresh_model(run_config(args, "fedit", source, train.label_names, out))
        test_encoded = encode(test, tokenizer, args.max_length)
        rows = []
        for name in args.settings:
            if name in reused:
                rows.append(reused[name])
                continue
            rows.append(run_setting(args, name, source, train.label_names, out, test_encoded))
            if args.results:
                append_row(Path(args.results), setup_of(args), asdict(rows[-1]))
    print(describe(args, how, train, test))
    print_table(rows)
    if args.plot:
        plot(rows, args.plot, f"{args.dataset}: {args.sites} sites, {args.rounds} rounds, {len(train)} train rows")
        print(f"plot: {args.plot}")
    print(summary_line(rows, args))
    return rows


if __name__ == "__main__":
    main()
