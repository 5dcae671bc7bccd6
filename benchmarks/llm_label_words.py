"""A real pretrained causal LM (the built-in smollm2-135m, frozen in NF4) classifying through label words, on real
data: the base zero-shot, centralized LoRA (one site holding every training row), FedAvg over --sites sites, and
FedAvg + DP-SGD (epsilon 8 per site) + secure aggregation, all scored on the same held-out test rows.

    python benchmarks/llm_label_words.py --dataset sms-spam --results benchmarks/results/llm_label_words.jsonl
    python benchmarks/llm_label_words.py --dataset pubmedqa --max-length 256 --max-train 500 --max-test 500 \
        --results benchmarks/results/llm_label_words.jsonl        # an hour and more on 2 CPU cores

Data (from shared/data beside the repository; never copied into it):
- sms-spam: the UCI SMS Spam Collection, texts deduplicated, shuffled with --seed; the first --max-test rows are the
  test set, the next --max-train rows the federation's. Prompt 'SMS: "{text}"\\nIs this SMS spam? Answer:', words
  "no" (ham) and "yes" (spam).
- pubmedqa: PQA-L; the 500 official test ids are the test set, the other items the federation's. The question and
  the abstract's contexts are the text (with --truncation-side left, the contexts first and the question last, so
  that a cut keeps the results and the question); prompt "{text}\\nAnswer (yes, no or maybe):", words yes / no /
  maybe.
Each site keeps 20% of its rows as its held-out split (used for the rounds' accuracy, never the test set). Settings
are fixed before any test score is seen (no tuning here). --results appends one JSON line per setting and a rerun
skips the settings already there (same dataset and arguments), so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("zero-shot", "central", "fedavg", "fedavg-dp-secagg")
TASKS = {
    "sms-spam": {"labels": ["ham", "spam"], "words": ["no", "yes"],
                 "template": 'SMS: "{text}"\nIs this SMS spam? Answer:'},
    "pubmedqa": {"labels": ["yes", "no", "maybe"], "words": ["yes", "no", "maybe"],
                 "template": "{text}\nAnswer (yes, no or maybe):"},
}


def data_dir(name: str) -> Path:
    for base in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if (base / name).is_dir():
            return base / name
    raise SystemExit(f"no {name} data under {ROOT.parent / 'shared' / 'data'}; see shared/data/README.md")


def sms_rows(seed: int) -> list[tuple[str, str]]:
    with (data_dir("sms-spam") / "SMSSpamCollection").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]  # row 0: the added header
    unique = list({text: label for label, text in rows if text}.items())
    random.Random(seed).shuffle(unique)
    return [(text, label) for text, label in unique]


def pubmedqa_split(truncation_side: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    folder = data_dir("pubmedqa")
    items = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8")))

    def row(item: dict) -> tuple[str, str]:
        question, context = f"Question: {item['QUESTION']}", f"Context: {' '.join(item['CONTEXTS'])}"
        # The kept end of the text holds the question: first under right truncation, last under left (which keeps
        # the abstract's results, the part that answers it).
        text = f"{context}\n{question}" if truncation_side == "left" else f"{question}\n{context}"
        return text, item["final_decision"]

    train = [row(item) for key, item in sorted(items.items()) if key not in test_ids]
    return train, [row(items[key]) for key in sorted(test_ids)]


def split(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if args.dataset == "sms-spam":
        rows = sms_rows(args.seed)
        return rows[args.max_test:args.max_test + args.max_train], rows[:args.max_test]
    train, test = pubmedqa_split(args.truncation_side)
    return train[:args.max_train], test[:args.max_test]


def write_train(rows: list[tuple[str, str]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def run_config(args: argparse.Namespace, setting: str, source: Path, out: Path) -> Any:
    from fedpeft.composition import from_mapping

    task = TASKS[args.dataset]
    central = setting == "central"
    sections: dict[str, dict[str, Any]] = {
        "model": {"name": args.model, "quantization": args.quantization, "classifier": "label-words",
                  "max_length": args.max_length, "truncation_side": args.truncation_side,
                  "prompt_template": task["template"], "label_words": task["words"]},
        "peft": {"method": "lora", "r": 8, "alpha": 16.0},
        "train": {"batch_size": args.batch_size, "learning_rate": args.lr,
                  "local_epochs": 1 if central else args.local_epochs,
                  "eval_batch_size": 32},
        "federation": {"rounds": args.epochs if central else args.rounds, "num_sites": 1 if central else args.sites,
                       "min_sites": 1 if central else args.sites, "round_timeout": args.round_timeout},
        "data": {"source": str(source), "label_names": task["labels"], "partitioner": "iid"},
        "run": {"name": setting, "out_dir": str(out), "seed": args.seed},
    }
    if setting == "fedavg-dp-secagg":
        sections["federation"].update(secure_aggregation=True, weighting="uniform")
        sections["privacy"] = {"dp": True, "target_epsilon": 8.0}
        sections["train"]["learning_rate"] = args.dp_lr
    return from_mapping(sections)


def test_accuracy(cfg: Any, adapter: Path | None, test: list[tuple[str, str]]) -> float:
    """The model (base + the run's final adapter, or the base alone) on the test rows: accuracy of the argmax."""
    from fedpeft.methods import load_saved_adapter, wrap_with_peft
    from fedpeft.models.loader import load_base_model
    from fedpeft.training.batches import encode_classification
    from fedpeft.training.trainer import predict

    labels = list(cfg.data.label_names)
    base, tokenizer = load_base_model(cfg.model, len(labels))
    model = load_saved_adapter(base, adapter) if adapter else wrap_with_peft(base, cfg.peft, "classification")
    data = encode_classification(tuple(t for t, _ in test), tuple(labels.index(y) for _, y in test), tokenizer,
                                 cfg.model.max_length)
    predicted = predict(model, data, cfg.train.eval_batch_size)
    return float((predicted == data.labels).float().mean())


def run_setting(args: argparse.Namespace, setting: str, source: Path, out: Path,
                test: list[tuple[str, str]]) -> dict[str, Any]:
    from fedpeft.simulations.engine import simulate

    cfg = run_config(args, setting, source, out)
    started = time.monotonic()
    record: dict[str, Any] = {}
    adapter = None
    if setting != "zero-shot":
        result = simulate(cfg)
        adapter = Path(result.summary["final_adapter"]) if result.summary.get("final_adapter") else None
        metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        sizes = [r["bytes_per_client"] for r in metrics if r.get("bytes_per_client")]
        record.update(rounds=cfg.federation.rounds, sites=cfg.federation.num_sites,
                      bytes_per_round=sizes[-1] if sizes else 0,
                      sites_returned=[r["sites_returned"] for r in metrics if "sites_returned" in r],
                      site_epsilon=result.summary.get("site_epsilon"),
                      train_seconds=round(time.monotonic() - started, 1))
        if adapter is None:
            raise SystemExit(f"{setting}: the run trained nothing ({result.summary.get('unchanged_reason')})")
    record["test_accuracy"] = test_accuracy(cfg, adapter, test)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def done_settings(path: str | None, key: dict[str, Any]) -> set[str]:
    if not path or not Path(path).is_file():
        return set()
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["setting"] for r in lines if r.get("key") == key}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(TASKS), default="sms-spam")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {SETTINGS}")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (--local-epochs each)")
    parser.add_argument("--epochs", type=int, default=3, help="centralized epochs (one round of one site each)")
    parser.add_argument("--local-epochs", type=int, default=1,
                        help="federated settings: local epochs per round (rounds x local epochs = a site's passes)")
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--truncation-side", choices=("right", "left"), default="right",
                        help="which end of a long text is cut (model.truncation_side); pubmedqa puts the question "
                             "at the kept end: first under right, after the contexts under left")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--dp-lr", type=float, default=1e-3)
    parser.add_argument("--model", default="smollm2-135m",
                        help="model.name: a built-in decoder or a local Hugging Face causal-LM directory")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-timeout", type=float, default=3600.0,
                        help="federation.round_timeout: on 2 cores Ray runs 2 sites at a time, so a round takes "
                             "about sites / 2 sites' training (600 s, the product's default, cut off 3 of 5 sites "
                             "at 2 local epochs of 80 PubMedQA rows)")
    parser.add_argument("--results", help="append one JSON line per setting; settings already there are skipped")
    args = parser.parse_args()
    # The timeout changes no result of a round that every site made in time (sites_returned says how many did).
    key = {k: v for k, v in vars(args).items() if k not in ("settings", "results", "round_timeout")}
    for option in ("local_epochs", "truncation_side", "model"):
        if key[option] == parser.get_default(option):  # results logged before the option existed keep matching
            del key[option]
    train, test = split(args)
    majority = max(set(y for _, y in train), key=[y for _, y in train].count)
    print(f"{args.dataset}: {len(train)} training rows, {len(test)} test rows; majority answer '{majority}' scores "
          f"{sum(y == majority for _, y in test) / len(test):.3f} on the test rows", flush=True)
    skip = done_settings(args.results, key)
    with tempfile.TemporaryDirectory(prefix="fedpeft-llm-") as tmp:
        source = Path(tmp) / "train.csv"
        write_train(train, source)
        for setting in args.settings.split(","):
            if setting in skip:
                print(f"{setting}: already in {args.results}, skipped", flush=True)
                continue
            record = {"benchmark": "llm_label_words", "dataset": args.dataset, "setting": setting, "key": key,
                      "majority_test_accuracy": sum(y == majority for _, y in test) / len(test),
                      **run_setting(args, setting, source, Path(tmp) / "runs", test)}
            print(json.dumps(record), flush=True)
            if args.results:
                with open(args.results, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
    print("summary: done", file=sys.stderr)


if __name__ == "__main__":
    main()
