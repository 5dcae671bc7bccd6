"""Tune the distributed-DP probe's defaults on validation rows (never the test set): rounds and server learning rate
per epsilon, for the sites' pooled training rows.

    python benchmarks/tune_private_probe.py --dataset banking77 --results benchmarks/results/tune_private_probe.jsonl
    python benchmarks/tune_private_probe.py --dataset medical-abstracts --results ...

Why a pooled study is the federation's own: a distributed-DP round with full batch (q = 1) releases the sum of every
site's clipped per-example gradients plus Skellam noise of variance mu, whatever the split among the sites; the
server divides by the expected batch and steps. This script runs that step on the sites' training rows together
(the rows ``benchmarks/private_probe.py`` gives the simulated sites, same split and seed) with Gaussian noise of the
Skellam noise's standard deviation (the accountant's mu for these dimensions, rounding included), and scores each
setting on the sites' held-out rows (validation carved from training data). Each row's cost in privacy terms: the
grid looks at the validation rows only; the test set is never read here.

It prints, per epsilon, the validation accuracy of each (rounds, learning rate) and the setting that
``fedpeft.privacy.defaults`` picks, with its rank in the grid.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from private_probe import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_SITES,
    add_site_arguments,
    features_of,
    fingerprint_of,
    run_config,
)
from real_data_sets import prepare, write_csv

from fedpeft.data.sites import site_split
from fedpeft.io.atomic import append_jsonl
from fedpeft.models.loader import load_base_model
from fedpeft.privacy import defaults, distributed, skellam
from fedpeft.training import probe


def pooled_parts(args: argparse.Namespace) -> tuple[probe.Features, probe.Features]:
    """The sites' training rows and held-out rows, pooled (the features the simulated sites cache)."""
    import tempfile

    import torch

    train, _test, _how = prepare(args)
    args.classes = len(train.label_names)
    with tempfile.TemporaryDirectory(prefix="fedpeft-tune-") as tmp:
        source = Path(tmp) / "train.csv"
        write_csv(train, source)
        args.max_rows = 10_000
        cfg = run_config(argparse.Namespace(**{**vars(args), "rounds": "1"}), source, train.label_names, tmp, None)
        model, tokenizer = load_base_model(cfg.model, args.classes)
        fingerprint = fingerprint_of(model)
        own, held = [], []
        for site in range(args.sites):
            split = site_split(cfg, site, args.sites)
            own.append(features_of(split.train, model, tokenizer, args, fingerprint))
            held.append(features_of(split.eval, model, tokenizer, args, fingerprint))
    cat = lambda parts: probe.Features(torch.cat([p.x for p in parts]), torch.cat([p.labels for p in parts]))  # noqa: E731
    return cat(own), cat(held)


def noise_std(epsilon: float, rounds: int, dim: int, delta: float) -> float:
    """The Skellam noise's standard deviation over the clip (the accountant's, rounding included), q = 1."""
    scale = distributed.SCALE_PER_ROOT_DIM * math.sqrt(dim)
    l2 = scale + math.sqrt(dim)
    l1 = skellam.rounded_l1_bound(l2_bound=l2, dim=dim)
    mu = skellam.mu_for(target_epsilon=epsilon, q=1.0, steps=rounds, l1=l1, l2=l2, delta=delta)
    return math.sqrt(mu) / scale


def run(train: probe.Features, validation: probe.Features, *, sigma: float, rounds: int, lr: float,
        seed: int) -> float:
    """Full-batch DP gradient descent with heavy-ball momentum 0.9, as server-sgd steps it; validation accuracy."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(int(train.labels.max()) + 1, train.x.shape[1])
    velocity = torch.zeros_like(weight)
    for _ in range(rounds):
        total = probe.clipped_gradient_sum(weight, train.x, train.labels, 1.0)
        noisy = total + sigma * torch.randn(weight.shape, generator=gen)
        velocity = 0.9 * velocity + noisy / len(train)
        weight = weight - lr * velocity
    return probe.evaluate(weight, validation).accuracy


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    args.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.dataset]
    args.sites = args.sites or DEFAULT_SITES[args.dataset]
    train, validation = pooled_parts(args)
    dim = train.x.shape[1] * args.classes
    done = _done(args)
    rows = []
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        for rounds in [int(r) for r in args.rounds.split(",")]:
            sigma = noise_std(epsilon, rounds, dim, 1e-5)
            for lr in [float(x) for x in args.lrs.split(",")]:
                key = f"{args.dataset} n={len(train)} eps={epsilon:g} rounds={rounds} lr={lr:g}"
                if key not in done:
                    accuracy = float(np.mean([run(train, validation, sigma=sigma, rounds=rounds, lr=lr, seed=s)
                                              for s in range(args.seeds)]))
                    done[key] = {"key": key, "dataset": args.dataset, "rows": len(train), "epsilon": epsilon,
                                 "rounds": rounds, "lr": lr, "sigma": sigma, "validation_accuracy": accuracy}
                    if args.results:
                        append_jsonl(Path(args.results), done[key])
                rows.append(done[key])
                print(f"eps {epsilon:g} rounds {rounds:4d} lr {lr:5g} sigma {sigma:6.2f} "
                      f"validation {done[key]['validation_accuracy']:.3f}", flush=True)
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        rows.append(_defaults_row(args, train, validation, epsilon, done))
    report(rows)
    return rows


def _defaults_row(args: argparse.Namespace, train: probe.Features, validation: probe.Features, epsilon: float,
                  done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The setting ``fedpeft.privacy.defaults`` derives for these rows and budget, scored the same way."""
    pick = defaults.probe_schedule(target_epsilon=epsilon, total_rows=len(train))
    key = f"{args.dataset} n={len(train)} eps={epsilon:g} defaults rounds={pick.rounds} lr={pick.learning_rate:g}"
    if key not in done:
        sigma = noise_std(epsilon, pick.rounds, train.x.shape[1] * args.classes, 1e-5)
        accuracy = float(np.mean([run(train, validation, sigma=sigma, rounds=pick.rounds, lr=pick.learning_rate,
                                      seed=s) for s in range(args.seeds)]))
        done[key] = {"key": key, "dataset": args.dataset, "rows": len(train), "epsilon": epsilon, "defaults": True,
                     "rounds": pick.rounds, "lr": pick.learning_rate, "sigma": sigma,
                     "validation_accuracy": accuracy}
        if args.results:
            append_jsonl(Path(args.results), done[key])
    return done[key]


def report(rows: list[dict[str, Any]]) -> None:
    for epsilon in sorted({r["epsilon"] for r in rows}):
        grid = sorted((r for r in rows if r["epsilon"] == epsilon and not r.get("defaults")),
                      key=lambda r: -r["validation_accuracy"])
        pick = next(r for r in rows if r["epsilon"] == epsilon and r.get("defaults"))
        better = sum(r["validation_accuracy"] > pick["validation_accuracy"] for r in grid)
        best = grid[0]
        print(f"eps {epsilon:g}: grid best rounds {best['rounds']} lr {best['lr']:g} validation "
              f"{best['validation_accuracy']:.3f}; defaults rounds {pick['rounds']} lr {pick['lr']:g} validation "
              f"{pick['validation_accuracy']:.3f} ({better} of {len(grid)} grid settings better)")


def _done(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if not args.results or not Path(args.results).is_file():
        return {}
    return {row["key"]: row for row in map(json.loads, Path(args.results).read_text().splitlines()) if row}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_site_arguments(p)  # the same sites, rows and features as benchmarks/private_probe.py
    p.add_argument("--epsilons", default="1,4,8")
    p.add_argument("--rounds", default="25,50,100,200,300,500")
    p.add_argument("--lrs", default="1,2,4,8,16")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--results", help="append-only JSONL of finished grid points (resume)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
