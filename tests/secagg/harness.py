"""An in-process stand-in for Flower's Grid: each message goes to the real site handler with that node's own Context.

Fast (no Ray, no transport) and exact about what the server sends: every exchange is recorded by round and type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpeft import wire
from fedpeft.errors import SecAggError
from fedpeft.messaging import Refusal
from fedpeft.secagg.client import handle_keys, handle_shares, handle_unmask, masked_integers, masked_upload, ready

HANDLERS = {wire.SECAGG_KEYS: handle_keys, wire.SECAGG_SHARES: handle_shares, wire.SECAGG_UNMASK: handle_unmask}
NODE_BASE = 5_000


class InProcessGrid:
    """``vanish``: (round, message type) -> node ids that do not answer that message.

    ``inputs(node, round)`` is the site's update: (values, weight) in float mode, an int64 vector in integer mode
    (``integer_bits`` set, with each site's ``min_cohort``).
    """

    def __init__(self, num_nodes: int, inputs: Callable[[int, int], object], *, clip_range: float = 4.0,
                 integer_bits: int | None = None, min_cohort: int = 0) -> None:
        self.nodes = [NODE_BASE + i for i in range(num_nodes)]
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={wire.NODE_PARTITION_ID: i},
                                       state=RecordDict(), run_config={}) for i, node in enumerate(self.nodes)}
        self.inputs, self.clip_range = inputs, clip_range
        self.integer_bits, self.min_cohort = integer_bits, min_cohort
        self.vanish: dict[tuple[int, str], set[int]] = {}
        self.messages: list[tuple[int, str, int]] = []  # (round, message type, destination) of every message
        self.requests: dict[tuple[int, str, int], Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
            self.messages.append((server_round, kind, node))
            self.requests[(server_round, kind, node)] = msg
            if node in self.vanish.get((server_round, kind), set()):
                continue
            handler = self.train if kind == MessageType.TRAIN else HANDLERS[kind]
            replies.append(handler(msg, self.contexts[node]))
        return replies

    def train(self, msg: Message, context: Context) -> Message:
        """Like fedpeft/client/app.py's train: the keys are checked before 'training', a refusal is typed."""
        config = msg.content[wire.CONFIG]
        node, server_round = msg.metadata.dst_node_id, int(config[wire.SERVER_ROUND])
        pid = int(context.node_config[wire.NODE_PARTITION_ID])
        try:
            ready(config, context)
        except SecAggError as err:
            return Message(Refusal.of(err).content(pid), reply_to=msg)
        if self.integer_bits:
            masked = masked_integers(config, context, self.inputs(node, server_round), bits=self.integer_bits,
                                     min_cohort=self.min_cohort)
        else:
            values, weight = self.inputs(node, server_round)
            masked = masked_upload(config, context, values, weight, clip_range=self.clip_range, bits=32)
        metrics = MetricRecord({wire.PARTITION_ID: pid, wire.TRAIN_LOSS: 0.0})
        return Message(RecordDict({wire.SA_MASKED: masked, wire.METRICS: metrics}), reply_to=msg)

    def kinds(self, server_round: int) -> list[str]:
        """The message types the server sent in a round, one entry per exchange, in order."""
        seen: list[str] = []
        for r, kind, _ in self.messages:
            if r == server_round and (not seen or seen[-1] != kind):
                seen.append(kind)
        return seen


def train_content(server_round: int) -> RecordDict:
    return RecordDict({wire.ADAPTER: ArrayRecord([np.zeros(1, dtype=np.float32)]),
                       wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round})})


def float_input(length: int) -> Callable[[int, int], tuple[np.ndarray, float]]:
    def inputs(node: int, server_round: int) -> tuple[np.ndarray, float]:
        rng = np.random.default_rng(1000 * server_round + node)
        return rng.normal(0, 1.5, length), float(rng.uniform(0.05, 1.0))

    return inputs


def integer_input(length: int) -> Callable[[int, int], np.ndarray]:
    def inputs(node: int, server_round: int) -> np.ndarray:
        return np.random.default_rng(77 * server_round + node).integers(-3000, 3000, length + 1)

    return inputs
