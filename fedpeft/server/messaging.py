"""Send one kind of instruction to a set of sites and sort the replies into successes and failures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire

TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE


@dataclass
class Replies:
    ok: list[Message] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> reason


def broadcast(grid: Grid, node_ids: Iterable[int], message_type: str, adapter: dict[str, Any],
              config: dict[str, Any], timeout: float) -> Replies:
    """The same adapter and config to every node."""
    import torch  # noqa: F401  (ArrayRecord needs torch imported to accept a state dict)

    content = RecordDict({wire.ADAPTER: ArrayRecord(adapter), wire.CONFIG: ConfigRecord(config)})
    return exchange(grid, {node: content for node in node_ids}, message_type,
                    str(config.get(wire.SERVER_ROUND, "")), timeout)


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, group: str,
             timeout: float) -> Replies:
    """Send each node its own content; a node that errs or does not answer in time is a failure."""
    messages = [Message(content=content, dst_node_id=node, message_type=message_type, group_id=group)
                for node, content in contents.items()]
    replies = Replies()
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            replies.failed[node] = short_reason(reply.error.reason)
        else:
            replies.ok.append(reply)
    for node in contents:
        if node not in answered:
            replies.failed[node] = f"no reply within {timeout:.0f} s"
    return replies


def short_reason(reason: str, limit: int = 300) -> str:
    """A site's error as one readable line: Ray wraps the cause in tracebacks; keep the final message."""
    marker = "Message:"
    text = reason.rsplit(marker, 1)[-1] if marker in reason else reason
    text = " ".join(text.replace("\\n", " ").split()).strip(" '>")
    return text if len(text) <= limit else text[: limit - 3] + "..."

