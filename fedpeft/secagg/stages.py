"""One secure round's exchanges with the sites: send a stage's messages, keep who failed, abort below the threshold."""

from __future__ import annotations

from collections.abc import Collection

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire
from fedpeft.errors import SecAggAbort
from fedpeft.messaging import Refusal, Replies, exchange


class Stages:
    """The exchanges of one round (set-up included, when the round starts a key epoch).

    ``failures``: node -> stage and reason (no reply, an error, a refused protocol step); ``sent``: the message type
    of each exchange, in order (a steady-state round sends two).
    """

    def __init__(self, grid: Grid, server_round: int, *, timeout: float, threshold: int) -> None:
        self.grid, self.round, self.timeout, self.threshold = grid, server_round, timeout, threshold
        self.failures: dict[int, str] = {}
        self.sent: list[str] = []

    def send(self, contents: dict[int, ConfigRecord], message_type: str, stage: str) -> Replies:
        """ConfigRecord-only messages; a typed refusal of a protocol step counts as a failure of the stage."""
        replies = self.exchange({node: RecordDict({wire.CONFIG: c}) for node, c in contents.items()}, message_type,
                                stage)
        answered = Replies(failed=replies.failed)
        for reply in replies.ok:
            refusal = Refusal.in_reply(reply)
            if refusal is None:
                answered.ok.append(reply)
            else:
                self.failures[reply.metadata.src_node_id] = f"{stage}: refused ({refusal.rule}): {refusal.reason}"
        return answered

    def exchange(self, contents: dict[int, RecordDict], message_type: str, stage: str) -> Replies:
        self.sent.append(message_type)
        replies = exchange(self.grid, contents, message_type, str(self.round), timeout=self.timeout)
        self.failures.update({node: f"{stage}: {reason}" for node, reason in replies.failed.items()})
        return replies

    def require(self, survivors: Collection[int], stage: str) -> None:
        if len(survivors) < self.threshold:
            why = "; ".join(f"site node {node}: {reason}" for node, reason in list(self.failures.items())[:3])
            raise SecAggAbort(f"round {self.round}: only {len(survivors)} sites completed {stage}, below the "
                              f"threshold {self.threshold}; nothing is decoded and the global adapter stays"
                              + (f" ({why})" if why else ""))
