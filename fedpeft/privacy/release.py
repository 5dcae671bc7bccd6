"""What a site's reply metrics say about its data: released exactly, coarsened, or not at all.

The DP guarantee covers what the mechanism releases (the noisy update or the noisy gradient sum). A site's reply
also carries numbers computed from its rows outside that guarantee: held-out accuracy and loss, training loss and
steps, row counts and the sampling rate (which is the batch over the rows). ``privacy.site_metrics`` -- and a
site's own policy key ``site_metrics``, the stricter of the two wins -- chooses how they leave:

``exact``   as computed (a simulation, or a federation whose sites accept it).
``coarse``  accuracy on a 0.05 grid, losses and counts to two significant digits, steps and the sampling rate
            likewise: enough to follow a run, too coarse to tell one row more or less in most cases. Coarsening is
            not differential privacy; docs/privacy.md says so.
``none``    no accuracy, no loss, no steps; counts and rates coarsened (plain FedAvg still weighs sites by them).
            The server then reports no held-out accuracy: evaluate the exported model on your own test set.

What stays exact in every mode: epsilon (computed from public parameters and the site's ledger), the partition
index and a refusal's flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedpeft import wire
from fedpeft.config.types import SITE_METRICS

ACCURACY_GRID = 0.05
SIGNIFICANT = 2

_SCORES = (wire.EVAL_ACCURACY,)
_LOSSES = (wire.EVAL_LOSS, wire.TRAIN_LOSS)
_COUNTS = (wire.NUM_EXAMPLES, wire.TRAIN_STEPS, wire.SAMPLE_RATE)
WITHHELD_WHEN_NONE = _SCORES + _LOSSES + (wire.TRAIN_STEPS,)


def score_text(value: float | None) -> str:
    """A score as a person reads it: three decimals, or why there is none."""
    return "not released" if value is None else f"{value:.3f}"


def stricter(*modes: str) -> str:
    """The mode that withholds the most of those given (a site's policy can only tighten the run's)."""
    return max(modes, key=SITE_METRICS.index)


def significant(value: float, digits: int = SIGNIFICANT) -> float:
    """``value`` to ``digits`` significant digits (0 and non-finite values unchanged)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def coarse_count(value: float) -> float:
    """A count to two significant digits, never 0 for a positive count (a weight of 0 would drop the site)."""
    rounded = significant(float(value))
    return max(rounded, 1.0) if value >= 1 else rounded


def release_metrics(metrics: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The metrics as they may leave the site under ``mode`` (one of ``SITE_METRICS``)."""
    if mode not in SITE_METRICS:
        raise ValueError(f"site metrics mode {mode!r}: choose one of {', '.join(SITE_METRICS)}")
    out = dict(metrics)
    if mode == "exact":
        return out
    if mode == "none":
        for key in WITHHELD_WHEN_NONE:
            out.pop(key, None)
    for key in _SCORES:
        if key in out and math.isfinite(float(out[key])):
            out[key] = round(round(float(out[key]) / ACCURACY_GRID) * ACCURACY_GRID, 2)
    for key in _LOSSES:
        if key in out:
            out[key] = significant(float(out[key]))
    for key in _COUNTS:
        if key in out:
            value = out[key]
            coarse = coarse_count(float(value)) if key != wire.SAMPLE_RATE else significant(float(value))
            out[key] = int(coarse) if isinstance(value, int) and not isinstance(value, bool) else coarse
    return out
