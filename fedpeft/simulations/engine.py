"""`fedpeft simulate`: a thin front over Flower's simulation engine running the same ServerApp and ClientApp
that `flwr run` loads.  It checks the data before Ray starts, so bad input fails in seconds, not mid-run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import RunConfig
from fedpeft.data.records import ClassificationData
from fedpeft.data.sites import SiteSplit, site_split
from fedpeft.errors import ConfigError
from fedpeft.privacy.defaults import derive_schedule
from fedpeft.runs.run_dir import SUMMARY_FILE, claim_run_dir


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    summary: dict[str, Any]
    majority_baseline: float | None
    seconds: float


def check_sites(cfg: RunConfig) -> list[SiteSplit]:
    """Build every site's split once in the driver: raises DataError (missing file, empty partition, ...) early;
    and every site's policy file (PrivacyError; FederationError when the sites' policies leave no round to train)."""
    from fedpeft.composition import site_policy_refusals

    site_policy_refusals(cfg)
    return [site_split(cfg, pid, cfg.federation.num_sites) for pid in range(cfg.federation.num_sites)]


def majority_baseline(splits: list[SiteSplit]) -> float | None:
    """Accuracy on the pooled held-out data of always predicting the pooled training data's most frequent label."""
    train = [s.train for s in splits if isinstance(s.train, ClassificationData)]
    held_out_sets = [s.eval for s in splits if isinstance(s.eval, ClassificationData)]
    if len(train) < len(splits) or len(held_out_sets) < len(splits):
        return None
    train_counts = Counter(label for data in train for label in data.labels)
    majority = train_counts.most_common(1)[0][0]
    held_out = [label for data in held_out_sets for label in data.labels]
    return sum(label == majority for label in held_out) / len(held_out)


def simulate(cfg: RunConfig, *, verbose: bool = False, cpus_per_site: float = 1.0,
             resume: bool = False, gpus_per_site: float = 0.0, ray_address: str | None = None) -> SimulationResult:
    """Run a federation; ``resume`` continues ``run.name`` after its last completed round instead of starting anew.

    Each simulated site's Ray actor reserves ``cpus_per_site`` CPUs and ``gpus_per_site`` GPUs. ``ray_address``:
    a Ray cluster to run on ("auto", "HOST:PORT"); default ``$RAY_ADDRESS`` if set, else a fresh local instance --
    never, silently, a cluster that ``ray start`` left running on this machine (docs/scale.md).
    """
    from flwr.simulation import run_simulation

    from fedpeft.client.app import build_client_app
    from fedpeft.client.mods import run_config_mod
    from fedpeft.server.app import build_server_app

    # One run per directory: held from here to the end (the ServerApp, a thread of this process, shares the hold).
    # A new run takes the first free name; --resume is refused here, before Ray starts and before anything is
    # written, when the named directory is missing, held by another process, or cannot be continued.
    if not cfg.federation.rounds:  # distributed DP, rounds derived from the budget and the rows the sites hold
        cfg = derive_schedule(cfg, total_rows=sum(len(split.train) for split in check_sites(cfg)))
    with claim_run_dir(cfg, resume=resume) as cfg:
        summary_path = Path(cfg.run.out_dir).expanduser() / cfg.run.name / SUMMARY_FILE
        earlier = _file_identity(summary_path)  # a resumed run's directory holds the summary of its first part
        baseline = majority_baseline(check_sites(cfg))
        flat = cfg.to_flat()
        started = time.monotonic()
        with _quiet_flower(verbose):
            run_simulation(server_app=build_server_app(flat), client_app=build_client_app([run_config_mod(flat)]),
                           num_supernodes=cfg.federation.num_sites, backend_name="ray",
                           backend_config=_backend_config(cpus_per_site, verbose, gpus_per_site, ray_address),
                           verbose_logging=verbose)
    run_dir = summary_path.parent
    if not summary_path.is_file() or _file_identity(summary_path) == earlier:
        raise RuntimeError(f"the simulation ended without writing {summary_path}; rerun with --verbose to see "
                           "Flower's log")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return SimulationResult(run_dir, summary, baseline, time.monotonic() - started)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``, None if absent: an atomic rewrite changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _backend_config(cpus_per_site: float, verbose: bool, gpus_per_site: float = 0.0,
                    ray_address: str | None = None) -> dict[str, Any]:
    # Site errors come back to the server as error replies (and are shown there), so the actors' own stdout, full
    # of library import chatter, is only forwarded with --verbose.
    if cpus_per_site <= 0 or gpus_per_site < 0:
        raise ConfigError(f"cpus_per_site = {cpus_per_site}, gpus_per_site = {gpus_per_site}: each site's actor "
                          "needs a positive number of CPUs and zero or more GPUs (e.g. 1 and 0.25)")
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    init_args: dict[str, Any] = {"address": address, "log_to_driver": verbose,
                                 "logging_level": logging.INFO if verbose else logging.ERROR}
    if address == "local":  # a fresh instance: no dashboard (seconds at every start, and a web port nobody asked for)
        init_args["include_dashboard"] = False
    return {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site}, "init_args": init_args}


@contextlib.contextmanager
def _quiet_flower(verbose: bool) -> Iterator[None]:
    """Keep the console to fedpeft's round table unless --verbose, and restore every setting afterwards.

    Flower logs every message at INFO; the rest is import-time chatter of the stack, harmless here: bitsandbytes'
    optional hub kernel, Ray's GPU tip, transformers' weight-loading progress bar and deprecation notices.
    """
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger("flwr"), logging.getLogger("bitsandbytes")]
    levels = [logger.level for logger in loggers]
    progress_bar = hf_logging.is_progress_bar_enabled()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("ignore", category=category)
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            hf_logging.disable_progress_bar()
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if progress_bar:
            hf_logging.enable_progress_bar()
