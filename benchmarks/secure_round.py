"""Wall time of a real federated round, secure aggregation vs plain, in one run: the same sites, model, data and
local training through Flower's simulation engine; only federation.secure_aggregation differs.

    python benchmarks/secure_round.py                            # MiniLM + LoRA, 20 simulated sites, 3 rounds
    python benchmarks/secure_round.py --model tiny-llama --sites 4 --rounds 2 --examples 80   # smoke size
Round 1 includes warm-up (actors load the model); the ratio uses the rounds after it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from fedpeft.composition import from_mapping
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate


def run(args: argparse.Namespace, secure: bool, out: str) -> list[dict]:
    cfg = from_mapping({
        "model": {"name": args.model, "max_length": 48},
        "federation": {"rounds": args.rounds, "num_sites": args.sites, "secure_aggregation": secure},
        "data": {"synthetic_examples": args.examples},
        "run": {"name": "secure" if secure else "plain", "out_dir": out},
    })
    result = simulate(cfg)
    rounds = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    return rounds[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=1200, help="generated examples, split over the sites")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as out:
        rows = {name: run(args, name == "secure", out) for name in ("plain", "secure")}
    print(f"{args.model}, {args.sites} sites, {args.examples} examples, rounds 1..{args.rounds} (round = train + "
          "aggregate + evaluate)")
    print(f"{'round':>5} {'plain s':>9} {'secure s':>9} {'ratio':>7} {'plain acc':>10} {'secure acc':>11}")
    for plain, secure in zip(rows["plain"], rows["secure"], strict=True):
        print(f"{plain['round']:>5} {plain['seconds']:>9.1f} {secure['seconds']:>9.1f} "
              f"{secure['seconds'] / plain['seconds']:>6.2f}x {plain['global_accuracy']:>10.3f} "
              f"{secure['global_accuracy']:>11.3f}")
    warm = slice(1, None) if args.rounds > 1 else slice(None)
    plain_s = statistics.mean(r["seconds"] for r in rows["plain"][warm])
    secure_s = statistics.mean(r["seconds"] for r in rows["secure"][warm])
    print(f"summary: secure round / plain round (warm rounds) = {secure_s / plain_s:.2f}x "
          f"({secure_s:.1f} s vs {plain_s:.1f} s)")


if __name__ == "__main__":
    main()
