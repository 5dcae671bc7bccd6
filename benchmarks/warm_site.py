"""Seconds per round of the same small federation deployed (a real coordinator and site agents on 127.0.0.1, each
site answering from its warm worker) and simulated (Flower's simulation engine): tiny-llama, 3 sites, DP-SGD and
secure aggregation (tests/deploy/federation.py's RUN_TOML), the same rows at every site.

    python benchmarks/warm_site.py                                   # 3 sites, 2 rounds, 48 rows per site
    python benchmarks/warm_site.py --rounds 3 --results /tmp/warm_site.jsonl

Goal (issue: deployed rounds were 5-10x simulated ones): deployed seconds per round <= 1.5x simulated. Both runs
are timed by the same server code (``seconds`` of each round in metrics.jsonl); round 0 is the initial evaluation,
round 1 also carries secure aggregation's key set-up (4 exchanges instead of 2) in both runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.deploy.federation: the deployment helpers

from tests.deploy.federation import build

GOAL = 1.5


def _rounds(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def deployed(root: Path, args: argparse.Namespace) -> tuple[list[dict], float]:
    deployment = build(root, examples_per_site=args.examples, rounds=args.rounds)
    started = time.monotonic()
    try:
        for site in deployment.sites:
            deployment.start_site(site)
        deployment.start_coordinator()
        deployment.wait_for(lambda: deployment.processes["coordinator"].poll() is not None, args.timeout,
                            "the deployed run's end", coordinator_runs=False)
        wall = time.monotonic() - started
        if deployment.processes["coordinator"].returncode != 0:
            raise SystemExit(f"the deployed run failed:\n{deployment.output('coordinator')[-3000:]}")
        for site in deployment.sites[:1]:  # what a site's console showed, for the report
            print("\n".join(line for line in deployment.output(site).splitlines() if "round" in line)[-1500:])
    finally:
        deployment.stop_all()
    return _rounds(deployment.run_dir / "metrics.jsonl"), wall


def simulated(root: Path, deployed_root: Path, args: argparse.Namespace) -> tuple[list[dict], float]:
    """The deployed run's config, its sites' own files concatenated and split back by a site column."""
    from fedpeft.composition import load_toml
    from fedpeft.simulations.engine import simulate

    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "site"])
        for site in ("a", "b", "c"):
            with (deployed_root / "pki" / "sites" / site / "data.csv").open(newline="") as rows:
                writer.writerows([*row, site] for row in list(csv.reader(rows))[1:])
    cfg = load_toml(deployed_root / "run.toml", {"run.name": "simulated", "run.out_dir": str(root / "runs"),
                                                   "data.source": str(data), "data.partitioner": "column",
                                                   "data.partition_column": "site", "federation.num_sites": 3})
    started = time.monotonic()
    result = simulate(cfg)
    return _rounds(result.run_dir / "metrics.jsonl"), time.monotonic() - started


def per_round(rounds: list[dict]) -> float:
    return statistics.mean(r["seconds"] for r in rounds if r["round"] >= 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", type=int, default=48, help="rows per site")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds the deployed run may take")
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--results", help="append one JSON line with the numbers to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(args.work or tempfile.mkdtemp(prefix="warm-site-"))
    deployed_rounds, deployed_wall = deployed(root / "deployed", args)
    simulated_rounds, simulated_wall = simulated(root / "simulated", root / "deployed", args)
    dep, sim = per_round(deployed_rounds), per_round(simulated_rounds)
    for name, rounds in (("deployed", deployed_rounds), ("simulated", simulated_rounds)):
        print(f"{name:9s} " + "  ".join(f"round {r['round']}: {r['seconds']:.1f} s" for r in rounds))
    ratio = dep / sim
    print(f"summary: seconds per round (rounds >= 1): deployed {dep:.1f}, simulated {sim:.1f}, ratio {ratio:.2f} "
          f"({'meets' if ratio <= GOAL else 'misses'} the <= {GOAL}x goal); wall: deployed {deployed_wall:.0f} s "
          f"(incl. agents' start), simulated {simulated_wall:.0f} s (incl. Ray's start); load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.results:
        line = {"benchmark": "warm_site", "sites": 3, "rounds": args.rounds, "rows_per_site": args.examples,
                "deployed_s_per_round": dep, "simulated_s_per_round": sim, "ratio": ratio,
                "deployed_rounds_s": [r["seconds"] for r in deployed_rounds],
                "simulated_rounds_s": [r["seconds"] for r in simulated_rounds],
                "load_avg": os.getloadavg()[0], "cpus": os.cpu_count()}
        with open(args.results, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
