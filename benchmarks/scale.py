"""How a simulated federation scales with the number of virtual clients: rounds per minute, peak memory and bytes
per client per round, for tiny-llama (the built-in 2-layer Llama) through Flower's simulation engine (Ray backend).

    python benchmarks/scale.py                                   # 10, 50 and 100 clients, 5 rounds each
    python benchmarks/scale.py --clients 10,50,100 --rounds 2    # what fits in ~10 minutes on a 2-core CPU
    python benchmarks/scale.py --clients 3 --rounds 1            # smoke size
    python benchmarks/scale.py --fraction-train 0.1 --plot benchmarks/scale.png

Every client holds --examples-per-client rows of the generated prompt/response data (causal-lm, the 4-bit NF4 base:
model.quantization = "auto"), split IID; with --task classification the quick-start's generated tickets (IID too).
A round = the sampled clients train (federation.fraction_train, default 1.0: all of them), the server aggregates,
then *every* client evaluates the new global adapter (fedpeft evaluates on all sites whatever fraction_train is).
Rounds per minute come from the per-round `seconds` of the run's metrics.jsonl (rounds 1..N; round 0, the initial
evaluation that also loads the model in every Ray actor, is left out). Memory: a background thread samples the driver's
process tree with psutil (Ray's gcs_server and raylet are children of the driver, the workers children of the raylet)
every --sample-every seconds: RSS of the driver, RSS summed over the Ray worker processes (the client actors
`ray::ClientAppActor` and Ray's prestarted `ray::IDLE` workers, not its agents), and PSS of the whole tree including
Ray's daemons (shared pages divided between the processes that map them; summed RSS counts each shared library and
Ray's shared-memory object store once per process). The peaks are maxima over samples, so short spikes between two
samples are missed. Each client count runs in a fresh process: Ray stays up after a simulation. With RAY_ADDRESS set
the run joins that Ray cluster (docs/scale.md) and its workers are not in this process tree: only the driver counts.
Bytes: the mean upload per client per round from metrics.jsonl; each sampled client also downloads the global adapter
(the same size) to train, and every client downloads it again to evaluate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedpeft.composition import from_mapping
from fedpeft.config import RunConfig
from fedpeft.runs.run_dir import METRICS_FILE
from fedpeft.simulations.engine import simulate

MIB = 1024 * 1024


@dataclass
class MemoryPeaks:
    driver_rss: int = 0
    workers_rss: int = 0  # summed over the Ray worker processes at one sample
    driver_workers_rss: int = 0  # driver + workers at one sample
    tree_pss: int = 0  # the whole process tree (driver, workers, Ray's own daemons)
    actors_seen: set[int] = field(default_factory=set)  # pids of the ClientAppActor processes
    idle_seen: set[int] = field(default_factory=set)  # pids seen as idle Ray workers (one may become an actor)
    samples: int = 0


def ray_worker_kind(proc: psutil.Process) -> str | None:
    """"actor" or "idle" for a Ray worker process (titled ``ray::ClientAppActor...`` / ``ray::IDLE`` by Ray's
    setproctitle), None for anything else: Ray's daemons (gcs_server, raylet, ``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``, log monitor) count in the tree's PSS only."""
    cmdline = proc.cmdline()
    title = cmdline[0].strip() if cmdline else ""
    if not title.startswith("ray::") or title.endswith("Agent"):
        return None
    return "idle" if title.startswith("ray::IDLE") else "actor"


class TreeSampler(threading.Thread):
    """Samples the RSS/PSS of this process and all its descendants until stopped; keeps the peaks."""

    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every, self.peaks, self.done = every, MemoryPeaks(), threading.Event()
        self.root = psutil.Process()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        driver = self.root.memory_info().rss
        workers, pss = 0, self.root.memory_full_info().pss
        for child in self.root.children(recursive=True):
            try:
                kind = ray_worker_kind(child)
                if kind is not None:
                    workers += child.memory_info().rss
                    (self.peaks.actors_seen if kind == "actor" else self.peaks.idle_seen).add(child.pid)
                pss += child.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        p = self.peaks
        p.driver_rss, p.workers_rss = max(p.driver_rss, driver), max(p.workers_rss, workers)
        p.driver_workers_rss = max(p.driver_workers_rss, driver + workers)
        p.tree_pss, p.samples = max(p.tree_pss, pss), p.samples + 1

    def stop(self) -> MemoryPeaks:
        self.done.set()
        self.join()
        self.sample()
        return self.peaks


def make_config(args: argparse.Namespace, clients: int, out: str) -> RunConfig:
    return from_mapping({
        "model": {"name": "tiny-llama", "task": args.task, "max_length": args.max_length},
        "federation": {"rounds": args.rounds, "num_sites": clients, "fraction_train": args.fraction_train},
        "data": {"synthetic_examples": clients * args.examples_per_client,
                 "partitioner": "iid"},
        "run": {"name": f"scale-{clients}", "out_dir": out},
    })


def rounds_per_minute(records: list[dict], wall: float, rounds: int) -> tuple[float, str]:
    """From the per-round ``seconds`` of rounds 1..N in metrics.jsonl; wall time / rounds if they are missing."""
    seconds = [r["seconds"] for r in records if r.get("round", 0) >= 1 and r.get("seconds")]
    if seconds:
        return 60.0 / statistics.mean(seconds), "metrics"
    return 60.0 * rounds / wall, "wall"


def run_single(args: argparse.Namespace, clients: int) -> dict:
    """One federation in this process, with the memory sampler running; returns the table row."""
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(args, clients, out)
        sampler = TreeSampler(args.sample_every)
        sampler.start()
        started = time.monotonic()
        try:
            result = simulate(cfg, cpus_per_site=args.cpus_per_site)
        finally:
            wall = time.monotonic() - started
            peaks = sampler.stop()
        records = [json.loads(line) for line in (result.run_dir / METRICS_FILE).read_text().splitlines()]
    trained = [r for r in records if r["round"] >= 1]
    per_minute, source = rounds_per_minute(records, wall, args.rounds)
    return {"clients": clients, "rounds": args.rounds, "wall_s": wall, "rounds_per_min": per_minute,
            "rate_from": source, "round_s": [round(r["seconds"], 2) for r in trained],
            "sampled": statistics.mean(r["sites_sampled"] for r in trained) if trained else 0,
            "bytes_per_client": statistics.mean(r["bytes_per_client"] for r in trained) if trained else 0,
            "train_loss": [r.get("train_loss") for r in trained],
            "driver_rss": peaks.driver_rss, "workers_rss": peaks.workers_rss,
            "driver_workers_rss": peaks.driver_workers_rss, "tree_pss": peaks.tree_pss,
            "load_1min": os.getloadavg()[0], "actors": len(peaks.actors_seen),
            "idle_workers": len(peaks.idle_seen - peaks.actors_seen), "samples": peaks.samples}


def run_isolated(args: argparse.Namespace, clients: int) -> dict:
    """Each client count in a fresh process: Ray stays up after a simulation, and memory would carry over."""
    import subprocess
    import sys

    command = [sys.executable, os.path.abspath(__file__), "--single", str(clients), *forwarded(args)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{clients} clients failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace) -> list[str]:
    return ["--rounds", str(args.rounds), "--task", args.task, "--max-length", str(args.max_length),
            "--examples-per-client", str(args.examples_per_client), "--fraction-train", str(args.fraction_train),
            "--cpus-per-site", str(args.cpus_per_site), "--sample-every", str(args.sample_every)]


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"tiny-llama ({args.task}{', nf4 base' if args.task == 'causal-lm' else ''}), {args.examples_per_client} "
          f"examples per client, {args.rounds} rounds, fraction_train {args.fraction_train}, {args.cpus_per_site} CPU "
          f"per client ({os.cpu_count()} CPUs), Ray backend; memory = peaks of psutil samples every "
          f"{args.sample_every} s")
    print(f"{'clients':>7} {'trained/rnd':>11} {'rounds/min':>10} {'s/round':>8} {'wall s':>7} {'driver RSS':>10} "
          f"{'workers RSS':>11} {'drv+wkr RSS':>11} {'tree PSS':>9} {'KiB up/client/rnd':>17}")
    for r in rows:
        print(f"{r['clients']:>7} {r['sampled']:>11.0f} {r['rounds_per_min']:>10.2f} {60 / r['rounds_per_min']:>8.1f} "
              f"{r['wall_s']:>7.0f} {r['driver_rss'] / MIB:>7.0f} MiB {r['workers_rss'] / MIB:>7.0f} MiB "
              f"{r['driver_workers_rss'] / MIB:>7.0f} MiB {r['tree_pss'] / MIB:>5.0f} MiB "
              f"{r['bytes_per_client'] / 1024:>17.1f}")
    print("machine load (1-min load average at each run's end, all users): "
          + ", ".join(f"{r['clients']} clients: {r['load_1min']:.1f}" for r in rows))
    print("per-round seconds (rounds 1..N): " + "; ".join(f"{r['clients']}: {r['round_s']}" for r in rows))
    print("Ray worker processes (client actors + idle workers): "
          + ", ".join(f"{r['clients']} clients: {r['actors']} + {r['idle_workers']}" for r in rows)
          + f"; rounds/min from {', '.join(sorted({r['rate_from'] for r in rows}))}")
    if any(r["actors"] == 0 for r in rows):
        print("no client actor was a descendant of the driver (an existing Ray cluster, RAY_ADDRESS?): the workers' "
              "memory is not measured here; see `ray memory` / `ray status` on the cluster")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(clients, [r["rounds_per_min"] for r in rows], marker="o")
    left.set(xlabel="virtual clients", ylabel="rounds per minute", title="throughput", ylim=(0, None))
    right.plot(clients, [r["driver_workers_rss"] / MIB for r in rows], marker="o", label="driver + workers RSS")
    right.plot(clients, [r["tree_pss"] / MIB for r in rows], marker="s", label="process tree PSS")
    right.set(xlabel="virtual clients", ylabel="MiB", title="peak memory", ylim=(0, None))
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(rows: list[dict]) -> str:
    first, last = rows[0], rows[-1]
    line = (f"summary: {last['clients']} clients: {last['rounds_per_min']:.2f} rounds/min, peak driver+workers RSS "
            f"{last['driver_workers_rss'] / MIB:.0f} MiB, {last['bytes_per_client'] / 1024:.1f} KiB up per client "
            "per round")
    if last is not first:
        line += (f"; vs {first['clients']} clients: {first['rounds_per_min'] / last['rounds_per_min']:.2f}x slower "
                 f"rounds, {last['driver_workers_rss'] / first['driver_workers_rss']:.2f}x memory")
    return line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,50,100", help="comma-separated virtual client counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--task", choices=("causal-lm", "classification"), default="causal-lm")
    parser.add_argument("--examples-per-client", type=int, default=10, help="generated rows per client (20%% held out)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--fraction-train", type=float, default=1.0, help="federation.fraction_train")
    parser.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray num_cpus per client (actors = CPUs / it)")
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--plot", help="write rounds/min and peak memory against clients to this image")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)  # internal: one count, JSON row on stdout
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.single:
        print(json.dumps(run_single(args, args.single)))
        return
    rows = [run_isolated(args, int(n)) for n in args.clients.split(",")]
    print_table(args, rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {Path(args.plot).resolve()}")
    print(summary(rows))


if __name__ == "__main__":
    main()
