"""Waiting for the sites before round 0: a deployment's sites connect over time, a simulation's are all there."""

from __future__ import annotations

import time

from flwr.serverapp import Grid

from fedpeft.config import FederationConfig
from fedpeft.errors import FederationError
from fedpeft.server.progress import ConsoleProgress

SIMULATION_SETTLE_SECONDS = 5.0  # a simulation registers its SuperNodes at start; unchanged this long: all there


def wait_for_sites(grid: Grid, federation: FederationConfig, *, timeout: float,
                   progress: ConsoleProgress) -> list[int]:
    """The connected nodes once ``federation.num_sites`` are there, or after ``timeout`` if at least
    ``min_sites`` are; a simulation with fewer SuperNodes than sites fails at once, naming both numbers."""
    wanted, deadline = federation.num_sites, time.monotonic() + timeout
    simulated = _is_simulation(grid)
    seen, steady_since = -1, time.monotonic()
    with progress.stage(f"waiting for {wanted} sites to connect"):
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= wanted or time.monotonic() > deadline:
                break
            if len(nodes) != seen:
                seen, steady_since = len(nodes), time.monotonic()
            elif simulated and time.monotonic() - steady_since > SIMULATION_SETTLE_SECONDS:
                raise FederationError(_too_few_simulated(len(nodes), wanted))
            time.sleep(0.5)
    if len(nodes) < federation.min_sites:
        raise FederationError(f"only {len(nodes)} sites connected within {timeout:.0f} s; "
                              f"federation.min_sites = {federation.min_sites}")
    return nodes


def _is_simulation(grid: Grid) -> bool:
    """Flower's simulation (`fedpeft simulate`, and `flwr run` on a simulation federation) runs the ServerApp over
    an in-memory grid whose SuperNodes all exist from the start: no more will connect."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def _too_few_simulated(present: int, wanted: int) -> str:
    return (f"this simulation's federation has {present} SuperNodes but federation.num_sites = {wanted}, and no more "
            f"will connect; with `flwr run`, give the federation {wanted} SuperNodes (--federation-config "
            f"num-supernodes={wanted}, or options.num-supernodes in its config) or run "
            f"--run-config 'federation.num_sites={present}'")
