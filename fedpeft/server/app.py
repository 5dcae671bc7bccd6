"""The ServerApp: wiring only. Reads the run config, builds the initial adapter, and runs the federation."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


def main(grid: Grid, context: Context) -> None:
    from fedpeft.composition import run_config
    from fedpeft.runs.export import write_model_info
    from fedpeft.runs.run_dir import open_run_dir
    from fedpeft.server.federation import Federation
    from fedpeft.server.initial import initial_adapter
    from fedpeft.server.polling import prompt
    from fedpeft.server.progress import ConsoleProgress

    cfg = run_config(context.run_config)
    with open_run_dir(cfg) as run_dir:  # one run per directory; refused before anything is written
        initial = initial_adapter(cfg)
        write_model_info(run_dir, cfg)  # the labels and the base, by name: what an export will say it predicts
        progress = ConsoleProgress(cfg.federation.rounds)
        progress.start(str(run_dir), cfg.federation.num_sites, sum(t.numel() for t in initial.wire.values()))
        Federation(prompt(grid), cfg, run_dir, initial, progress=progress).run()


def build_server_app(run_config: Mapping[str, bool | int | float | str] | None = None) -> ServerApp:
    """``run_config`` is what `fedpeft simulate` resolved; under `flwr run` Flower fills the context instead."""
    server_app = ServerApp()
    fixed = dict(run_config or {})

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config.update(fixed)
        main(grid, context)

    return server_app


app = build_server_app()  # the component that `flwr run` loads ([tool.flwr.app.components] serverapp)
