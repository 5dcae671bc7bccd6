"""Replies as soon as they arrive from a SuperLink.

Flower's ``HttpGrid.send_and_receive`` (the Grid a ServerApp gets from a SuperLink) sleeps 3 s between two pulls of
the replies, so every exchange of a deployed round waits 1.5 s on average after its last reply came in; a secure
round is two to four exchanges, an evaluation one more. ``PromptGrid`` keeps Flower's own push and pull calls and
pulls every ``POLL_SECONDS`` instead. Simulation's in-memory Grid already pulls every 0.1 s and is left as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL_SECONDS = 0.2  # one pull request to the local SuperLink per 0.2 s while an exchange is open


class PromptGrid(Grid):
    """``grid``'s push, pull and node calls, with its own reply polling."""

    def __init__(self, grid: Grid, poll_seconds: float = POLL_SECONDS) -> None:
        self._grid, self._poll = grid, poll_seconds

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # deprecated in Flower; kept for the contract
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: push, then pull until every message has its reply or ``timeout`` (None: no limit)."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll)
        return replies


def prompt(grid: Grid) -> Grid:
    """A SuperLink's Grid wrapped in ``PromptGrid``; any other Grid (simulation's in-memory one) unchanged."""
    from flwr.superlink.grid import HttpGrid

    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid
