"""Client mods: per-message concerns that wrap the handlers, in Flower's ``(msg, ctx, call_next)`` form."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flwr.app import Context, Message

Handler = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, Handler], Message]


def run_config_mod(flat_config: Mapping[str, bool | int | float | str]) -> Mod:
    """Give every node the run config that ``fedpeft simulate`` resolved.

    ``flwr run`` fills ``context.run_config`` from pyproject.toml and --run-config; the in-process simulation entry
    has no app directory to read it from, so it hands the same flat config to the nodes through this mod.
    """
    frozen = dict(flat_config)

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        # Flower forbids editing context.run_config, so the handler gets a view with the same node state object
        # (state written by the handler persists) and the resolved run config.
        view = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                       state=context.state, run_config={**context.run_config, **frozen})
        return call_next(msg, view)

    return mod
