"""Federated causal-LM fine-tuning (LoRA on a 4-bit NF4 base) on PubMedQA's expert-labelled set (PQA-L): does the
loss go down over the rounds?

    python benchmarks/pubmedqa_causal.py --max-train 300 --sites 4 --rounds 4 --max-length 128 \
        --plot benchmarks/pubmedqa_loss.png                     # tiny-llama on the NF4 base, ~2 min on 2 CPU cores
    python benchmarks/pubmedqa_causal.py --model /models/my-llama --sites 5 --rounds 5 --max-length 384
    python benchmarks/pubmedqa_causal.py --max-train 20 --rounds 1 --sites 2 --max-length 64   # smoke size

Data: --data-dir holds ori_pqal.json and test_ground_truth.json (default: shared/data/pubmedqa beside the repository,
see its SOURCE.md: MIT, Jin et al. 2019). Each item becomes prompt = "Question: ... Context: ... Answer (yes, no or
maybe):" and response = "<decision>. <long answer>", written to a JSONL in a temporary directory (never into the
repository). The 500 official test ids are held out of the federation; the other items (at most --max-train) are
split IID over --sites simulated sites, each keeping 20% as its held-out split (the held-out loss below).
The table shows, per round, the sites' mean training loss and the pooled held-out loss on the response tokens, from
the run's metrics.jsonl (round 0 = the untrained adapter). With --model PATH (a local causal LM) or --score, the final
global adapter is loaded from the run directory onto the base and each test question's decision is scored: the one
of "yes" / "no" / "maybe" with the highest log-likelihood after the prompt (deterministic, three forward passes per
question); accuracy is printed beside the base without the adapter and always answering the training items'
majority decision. --out DIR keeps the run directory (its run_config.json names the temporary JSONL, deleted at exit).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from fedpeft.composition import from_mapping
from fedpeft.config import RunConfig
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate

DECISIONS = ("yes", "no", "maybe")
ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """``shared/data/pubmedqa`` next to the repository root (or inside it, where a checkout carries shared/)."""
    candidates = [ROOT.parent / "shared" / "data" / "pubmedqa", ROOT / "shared" / "data" / "pubmedqa"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def load_pqal(data_dir: Path) -> tuple[dict[str, dict], set[str]]:
    """PQA-L items keyed by PMID, and the official test PMIDs."""
    items = json.loads((data_dir / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((data_dir / "test_ground_truth.json").read_text(encoding="utf-8")))
    missing = test_ids - set(items)
    if missing:
        raise SystemExit(f"{len(missing)} test ids are not in ori_pqal.json (e.g. {sorted(missing)[:3]})")
    return items, test_ids


def to_pair(pmid: str, item: dict) -> dict[str, str]:
    """One item as a prompt/response row: the question first, so that truncation cuts the context's end."""
    decision = item["final_decision"].strip().lower()
    if decision not in DECISIONS:
        raise ValueError(f"item {pmid}: final_decision {decision!r} is not one of {DECISIONS}")
    context = " ".join(part.strip() for part in item["CONTEXTS"])
    prompt = f"Question: {item['QUESTION'].strip()}\nContext: {context}\nAnswer (yes, no or maybe):"
    return {"id": pmid, "prompt": prompt, "response": f"{decision}. {item['LONG_ANSWER'].strip()}",
            "decision": decision}


def split_rows(items: dict[str, dict], test_ids: set[str], max_train: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) in PMID order; ``max_train`` > 0 keeps the first that many training rows."""
    train = [to_pair(pmid, items[pmid]) for pmid in sorted(items) if pmid not in test_ids]
    test = [to_pair(pmid, items[pmid]) for pmid in sorted(items) if pmid in test_ids]
    return (train[:max_train] if max_train else train), test


def write_jsonl(rows: list[dict], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"prompt": row["prompt"], "response": row["response"]}) + "\n")
    return path


def make_config(args: argparse.Namespace, source: Path, out: str) -> RunConfig:
    return from_mapping({
        "model": {"name": args.model, "task": "causal-lm", "max_length": args.max_length,
                  "quantization": args.quantization},
        "peft": {"r": args.r},
        "train": {"batch_size": args.batch_size, "learning_rate": args.lr, "local_epochs": args.local_epochs},
        "federation": {"rounds": args.rounds, "num_sites": args.sites},
        "data": {"source": str(source), "partitioner": "iid", "eval_fraction": 0.2},
        "run": {"name": "pubmedqa-causal", "out_dir": out, "seed": args.seed},
    })


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line]


def load_final_model(run_dir: Path) -> tuple:
    """The base as the sites loaded it (run_config.json) with the last global adapter from ``adapters/LATEST``."""
    from fedpeft.methods import load_saved_adapter
    from fedpeft.models.loader import load_base_model
    from fedpeft.runs.checkpoint import latest_adapter
    from fedpeft.runs.run_dir import CONFIG_FILE

    config_path = run_dir / CONFIG_FILE
    cfg = from_mapping(json.loads(config_path.read_text(encoding="utf-8")), origin=str(config_path))
    base, tokenizer = load_base_model(cfg.model, 0)
    adapter = latest_adapter(run_dir)
    if adapter is None:
        raise SystemExit(f"{run_dir} has no global adapter (adapters/LATEST)")
    model = load_saved_adapter(base, adapter)  # a peft LoRA model (PeftModel.from_pretrained)
    model.eval()
    return model, tokenizer, cfg.model.max_length


def decision_logprobs(model, tokenizer, prompts: list[str], max_length: int):
    """(len(prompts), 3) summed log-likelihoods of "yes" / "no" / "maybe" as the response, encoded exactly as in
    training ([BOS] prompt [SEP] response, the prompt truncated first) with the response's EOS left unscored."""
    import torch

    from fedpeft.training.batches import IGNORE_INDEX, encode_prompt_response, trim_batch
    from fedpeft.training.trainer import on_model_device

    repeated = tuple(p for p in prompts for _ in DECISIONS)
    data = encode_prompt_response(repeated, DECISIONS * len(prompts), tokenizer, max_length)
    labels = data.labels.clone()
    for row in labels:
        row[(row != IGNORE_INDEX).nonzero().max()] = IGNORE_INDEX  # the EOS after the decision word
    batch = on_model_device(trim_batch(data.input_ids, data.attention_mask, labels), model)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * scored).sum(dim=1).view(len(prompts), len(DECISIONS)).cpu()


def predict(model, tokenizer, rows: list[dict], max_length: int, batch: int) -> list[str]:
    picks: list[str] = []
    for start in range(0, len(rows), batch):
        prompts = [r["prompt"] for r in rows[start: start + batch]]
        picks += [DECISIONS[i] for i in decision_logprobs(model, tokenizer, prompts, max_length).argmax(dim=1)]
    return picks


def decision_accuracy(run_dir: Path, test: list[dict], majority: str, batch: int) -> dict:
    """Accuracy of the final global adapter, of the base with the adapter disabled, and of always answering
    ``majority`` (the training items' most frequent decision)."""
    model, tokenizer, max_length = load_final_model(run_dir)
    truth = [r["decision"] for r in test]
    adapter = predict(model, tokenizer, test, max_length, batch)
    with model.disable_adapter():
        base = predict(model, tokenizer, test, max_length, batch)

    def accuracy(picks: list[str]) -> float:
        return sum(p == t for p, t in zip(picks, truth, strict=True)) / len(truth)

    return {"n": len(truth), "adapter": accuracy(adapter), "base": accuracy(base), "majority": majority,
            "majority_acc": truth.count(majority) / len(truth),
            "adapter_picks": {d: adapter.count(d) for d in DECISIONS}}


def print_rounds(records: list[dict]) -> None:
    print(f"{'round':>5} {'train loss':>10} {'held-out loss':>13} {'held-out token acc':>18} {'seconds':>8}")
    for r in records:
        train = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        print(f"{r['round']:>5} {train:>10} {r['global_eval_loss']:>13.4f} {r['global_accuracy']:>18.3f} "
              f"{r['seconds']:>8.1f}")


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    trained = [r for r in records if r.get("train_loss") is not None]
    ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker="o", label="train (site mean)")
    ax.plot([r["round"] for r in records], [r["global_eval_loss"] for r in records], marker="s",
            label="held-out (pooled)")
    ax.set(xlabel="round", ylabel="loss on response tokens", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(records: list[dict], scores: dict | None) -> str:
    first, last = records[0], records[-1]
    trained = [r for r in records if r.get("train_loss") is not None]
    change = (last["global_eval_loss"] - first["global_eval_loss"]) / first["global_eval_loss"]
    line = (f"summary: held-out loss round {first['round']} {first['global_eval_loss']:.4f} -> round {last['round']} "
            f"{last['global_eval_loss']:.4f} ({change:+.1%})")
    if trained:
        line += (f"; train loss round {trained[0]['round']} {trained[0]['train_loss']:.4f} -> round "
                 f"{trained[-1]['round']} {trained[-1]['train_loss']:.4f}")
    if scores:
        line += f"; test decision accuracy {scores['adapter']:.3f} (majority {scores['majority_acc']:.3f})"
    return line


def print_scores(scores: dict) -> None:
    print(f"decision accuracy on {scores['n']} test questions (highest log-likelihood of yes/no/maybe after the "
          f"prompt): final global adapter {scores['adapter']:.3f}, base without adapter {scores['base']:.3f}, "
          f"always '{scores['majority']}' (training majority) {scores['majority_acc']:.3f}; adapter's picks "
          + ", ".join(f"{d} {n}" for d, n in scores["adapter_picks"].items()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="holds ori_pqal.json and "
                        "test_ground_truth.json (default: %(default)s)")
    parser.add_argument("--model", default="tiny-llama", help="'tiny-llama' or a local causal LM directory")
    parser.add_argument("--quantization", default="nf4", choices=("nf4", "fp4", "int8", "none"))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (prompt truncated first)")
    parser.add_argument("--max-train", type=int, default=0, help="training items (0: all 500 non-test items)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", action="store_true", help="score the test decisions with tiny-llama too")
    parser.add_argument("--max-test", type=int, default=0, help="test questions to score (0: all 500)")
    parser.add_argument("--score-batch", type=int, default=8, help="test questions per forward pass")
    parser.add_argument("--plot", help="draw the loss curves to this image (matplotlib)")
    parser.add_argument("--out", help="keep the run directory under this folder (default: a temporary one)")
    return parser.parse_args()


def run(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict | None]:
    items, test_ids = load_pqal(args.data_dir)
    train, test = split_rows(items, test_ids, args.max_train)
    test = test[: args.max_test] if args.max_test else test
    source = write_jsonl(train, tmp / "pubmedqa_train.jsonl")
    cfg = make_config(args, source, args.out or str(tmp / "runs"))
    print(f"PubMedQA PQA-L: {len(train)} training items over {args.sites} sites (IID, 20% of each held out), "
          f"{len(test_ids)} test ids kept out of the federation; model {args.model}, base {args.quantization}, "
          f"LoRA r={args.r}, max_length {args.max_length}, batch {args.batch_size}, lr {args.lr}")
    result = simulate(cfg)
    print(f"run: {result.run_dir} ({result.seconds:.0f} s)")
    records = read_metrics(result.run_dir)
    if args.model == "tiny-llama" and not args.score:
        return records, None
    majority = max(DECISIONS, key=[r["decision"] for r in train].count)
    scores = decision_accuracy(result.run_dir, test, majority, args.score_batch)
    return records, scores


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model != "tiny-llama" and not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model!r} is neither 'tiny-llama' nor a local model directory")
    if not (args.data_dir / "ori_pqal.json").is_file():
        raise SystemExit(f"no ori_pqal.json in {args.data_dir}; pass --data-dir")
    with tempfile.TemporaryDirectory(prefix="fedpeft-pubmedqa-") as tmp:
        records, scores = run(args, Path(tmp))
    print_rounds(records)
    if scores:
        print_scores(scores)
    if args.plot:
        plot(records, args.plot, f"PubMedQA, {args.model}, {args.sites} sites")
        print(f"plot: {Path(args.plot).resolve()}")
    print(summary(records, scores))


if __name__ == "__main__":
    main()
