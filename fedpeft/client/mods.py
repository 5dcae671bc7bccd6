"""Client mods: per-message concerns that wrap the handlers, in Flower's ``(msg, ctx, call_next)`` form."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from fedpeft.messaging import without_paths

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


def error_reply(msg: Message, ex: BaseException) -> Message:
    """The error reply Flower's flwr-clientapp makes of a handler's exception (its wording), without the site's
    file paths: the reason leaves the site, so the full traceback goes to this process's stderr (the site's log)."""
    traceback.print_exception(ex)
    reason = without_paths(str(type(ex)) + ":<'" + str(ex) + "'>")
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def errors_without_paths(msg: Message, context: Context, call_next: Handler) -> Message:
    """Client mod: a handler's exception comes back as Flower's error reply, its reason without file paths (left to
    Flower, the exception's text, e.g. a missing data file's full path, would reach the coordinator)."""
    try:
        return call_next(msg, context)
    except Exception as ex:
        return error_reply(msg, ex)
