"""Time to plan a DP-SGD round's noise, in one run: Opacus' own planning (``get_noise_multiplier`` with its PRV
accountant: bisection, every RDP curve computed afresh) against fedpeft's (``privacy.planning.noise_multiplier_for``:
cached curves, safeguarded secant), on the same questions; plus fedpeft's later rounds, which plan after a history.

    python benchmarks/noise_planning.py     # what sites of the test suite, PubMedQA and banking77 plan
Each timing is the best of --repeats in a fresh state (fedpeft's caches cleared before each), after one warm-up call
that pays the imports. Prints one row per setting and the ratio of the totals.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

SETTINGS = [  # (target epsilon, sample rate, steps of the whole plan): what a site asks in round 1
    (8.0, 16 / 48, 12),  # the suite's tiny federations: 48 rows, batch 16, 2 local epochs, 2 rounds
    (8.0, 4 / 80, 40),  # PubMedQA sites: 80 rows, batch 4, 1 local epoch, 2 rounds
    (8.0, 32 / 2000, 630),  # a banking77 site: 2,000 rows, batch 32, 5 local epochs, 2 rounds
    (1.0, 0.01, 1000),
]
DELTA = 1e-5


def best_of(repeats: int, call: Callable[[], float], fresh: Callable[[], None]) -> tuple[float, float]:
    times, value = [], 0.0
    for _ in range(repeats):
        fresh()
        started = time.perf_counter()
        value = call()
        times.append(time.perf_counter() - started)
    return min(times), value


def clear_caches() -> None:
    from fedpeft.privacy import accounting, rdp_cache

    accounting._remembered_epsilon.cache_clear()
    rdp_cache.rdp_per_step.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from opacus.accountants.utils import get_noise_multiplier

    from fedpeft.privacy.planning import noise_multiplier_for

    noise_multiplier_for(8.0, DELTA, 0.5, 3)  # warm-up: imports
    totals = [0.0, 0.0]
    print(f"{'target':>6} {'rate':>7} {'steps':>5} | {'opacus s':>8} {'sigma':>7} | {'fedpeft s':>9} {'sigma':>7} | "
          f"{'round 2 s':>9} {'sigma':>7}")
    for target, rate, steps in SETTINGS:
        theirs, sigma_theirs = best_of(args.repeats, lambda t=target, q=rate, n=steps: get_noise_multiplier(
            target_epsilon=t, target_delta=DELTA, sample_rate=q, steps=n, accountant="prv"), lambda: None)
        ours, sigma_ours = best_of(args.repeats, lambda t=target, q=rate, n=steps: noise_multiplier_for(
            t, DELTA, q, n), clear_caches)
        history = [(sigma_ours, rate, steps // 2)]  # round 2 plans its half after round 1's release
        later, sigma_later = best_of(args.repeats, lambda t=target, q=rate, n=steps, h=history: noise_multiplier_for(
            t, DELTA, q, n - n // 2, history=h), clear_caches)
        totals[0] += theirs
        totals[1] += ours
        print(f"{target:>6g} {rate:>7.4f} {steps:>5} | {theirs:>8.2f} {sigma_theirs:>7.4f} | {ours:>9.2f} "
              f"{sigma_ours:>7.4f} | {later:>9.2f} {sigma_later:>7.4f}")
    print(f"fedpeft / Opacus planning time, round 1 questions: {totals[1] / totals[0]:.2f}x "
          f"({totals[1]:.2f} s vs {totals[0]:.2f} s)")


if __name__ == "__main__":
    main()
