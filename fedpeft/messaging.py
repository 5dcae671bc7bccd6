"""Send one kind of instruction to a set of sites and sort the replies into successes, refusals and failures.

Below both the server and secure aggregation: each exchanges messages over Flower's Grid this way. A site's "no"
to a round travels as a typed ``Refusal`` (rule + reason), never as a string to parse back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire

TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE
_R = TypeVar("_R", ConfigRecord, MetricRecord, ArrayRecord)
_PATH = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\][^\s'\"]*[^\s'\",.;:)\]]")  # an absolute or home path
# A quoted path (it may hold spaces): absolute, home or ./-relative, or with a directory and a file suffix.
_QUOTED_PATH = re.compile(r"""(['"])((?:~|[A-Za-z]:|\.{1,2})?[/\\][^'"\n]*|[^'"\n]*[/\\][^'"\n]*\.[A-Za-z]\w{0,7})\1""")
# A relative path: ./ or ../ first, or directories then a file with a suffix (sites/a/policy.toml; not "1/2").
_RELATIVE_PATH = re.compile(
    r"(?<![\w./\\<-])(?:\.{1,2}[/\\][^\s'\"]*[^\s'\",.;:)\]]|(?:[\w.-]+[/\\])+[\w.-]*\.[A-Za-z]\w{0,7}(?![\w/\\]))")
_SITE_FILE = "<site file>"
# What is left of an unquoted path with spaces: a replaced path, then words holding a '/' or another replaced path.
_REPEATED = re.compile(r"<site file>(?:\s*(?:<site file>|[\w.~-]*[/\\][^\s'\",;:)\]]*))+")


@dataclass(frozen=True)
class Refusal:
    """A site's typed "no" to a round: the rule that forbids it and the reason in values.

    The reason never carries the site's file paths (its own log keeps the full message): a path that slipped into
    a message is replaced before it leaves the site.
    """

    rule: str
    reason: str

    @classmethod
    def of(cls, err: Exception) -> Refusal:
        rule = getattr(err, "rule", None) or type(err).__name__
        public = getattr(err, "public", None)
        return cls(str(rule), without_paths(public if public is not None else str(err)))

    def content(self, partition_id: int) -> RecordDict:
        """The reply's content: the refusal and the partition it comes from (metrics say a refusal happened)."""
        return RecordDict({
            wire.METRICS: MetricRecord({wire.REFUSED: 1, wire.PARTITION_ID: partition_id}),
            wire.CONFIG: ConfigRecord({wire.REFUSAL_RULE: self.rule, wire.REFUSAL_REASON: self.reason})})

    @classmethod
    def in_reply(cls, reply: Message) -> Refusal | None:
        """The refusal a reply carries, or None when the site did not refuse."""
        return cls.in_content(reply.content)

    @classmethod
    def in_content(cls, content: RecordDict) -> Refusal | None:
        metrics = content.get(wire.METRICS)
        if metrics is None or not as_int(metrics.get(wire.REFUSED, 0)):
            return None
        config: Mapping[str, object] = content.get(wire.CONFIG) or {}
        return cls(str(config.get(wire.REFUSAL_RULE, "unknown")), str(config.get(wire.REFUSAL_REASON, "")))


# ---- Typed reads of what a message carries. Flower types a record as any of its three kinds and a record value as
# any type a record may hold; the wire protocol fixes which one each key carries. Anything else is a malformed
# message, and raises the TypeError that int(), float() or bytes() raise for a value they cannot convert.

def config_record(content: RecordDict, key: str = wire.CONFIG) -> ConfigRecord:
    return _record(content, key, ConfigRecord)


def metric_record(content: RecordDict, key: str = wire.METRICS) -> MetricRecord:
    return _record(content, key, MetricRecord)


def array_record(content: RecordDict, key: str = wire.ADAPTER) -> ArrayRecord:
    return _record(content, key, ArrayRecord)


def _record(content: RecordDict, key: str, kind: type[_R]) -> _R:
    record = content[key]
    if not isinstance(record, kind):
        raise TypeError(f"message record '{key}' is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def as_int(value: object) -> int:
    """``int(value)`` of a record value that holds one number."""
    if isinstance(value, int | float | str | bytes):
        return int(value)
    raise TypeError(f"expected a number in the message, got {type(value).__name__}")


def as_float(value: object) -> float:
    """``float(value)`` of a record value that holds one number."""
    if isinstance(value, int | float | str | bytes):
        return float(value)
    raise TypeError(f"expected a number in the message, got {type(value).__name__}")


def as_bytes(value: object) -> bytes:
    """A record value that holds bytes (a key, a share, a ciphertext)."""
    if isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes in the message, got {type(value).__name__}")


def as_list(value: object) -> list[Any]:
    """A record value that holds a list (its items are converted where they are read)."""
    if isinstance(value, list):
        return value
    raise TypeError(f"expected a list in the message, got {type(value).__name__}")


def without_paths(text: str) -> str:
    """``text`` with file paths replaced: what leaves a site names rules and values, not its files. Absolute, home,
    quoted (spaces included) and relative paths with a directory are replaced; best effort for text that no rule
    wrote: a refusal's own reason (``PrivacyError.public``) names no path in the first place."""
    text = _QUOTED_PATH.sub(lambda m: f"{m.group(1)}{_SITE_FILE}{m.group(1)}", text)
    text = _PATH.sub(_SITE_FILE, text)
    text = _RELATIVE_PATH.sub(_SITE_FILE, text)
    return _REPEATED.sub(_SITE_FILE, text)


@dataclass
class Replies:
    ok: list[Message] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> reason


def broadcast(grid: Grid, node_ids: Iterable[int], message_type: str, adapter: dict[str, Any], *,
              config: dict[str, Any], timeout: float) -> Replies:
    """The same adapter and config to every node."""
    import torch  # noqa: F401  (ArrayRecord needs torch imported to accept a state dict)

    content = RecordDict({wire.ADAPTER: ArrayRecord(adapter), wire.CONFIG: ConfigRecord(config)})
    return exchange(grid, {node: content for node in node_ids}, message_type,
                    str(config.get(wire.SERVER_ROUND, "")), timeout=timeout)


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, group: str, *,
             timeout: float) -> Replies:
    """Send each node its own content; a node that errs or does not answer in time is a failure."""
    messages = [Message(content=content, dst_node_id=node, message_type=message_type, group_id=group)
                for node, content in contents.items()]
    replies = Replies()
    answered: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = _addressee(reply, messages)
        answered.add(node)
        if reply.has_error():
            replies.failed[node] = short_reason(reply.error.reason or f"error code {reply.error.code}")
        else:
            replies.ok.append(reply)
    for node in contents:
        if node not in answered:
            replies.failed[node] = f"no reply within {timeout:.0f} s"
    return replies


def _addressee(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for. An error the SuperLink writes itself (the node stopped sending heartbeats)
    comes from the SuperLink's own node id, not the site's: match it to the message it replies to, or the site
    would count as silent and the error as a phantom node."""
    source = reply.metadata.src_node_id
    if any(message.metadata.dst_node_id == source for message in sent):
        return source
    by_id = {message.metadata.message_id: message.metadata.dst_node_id for message in sent
             if message.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, source)


def short_reason(reason: str, limit: int = 300) -> str:
    """A site's error as one readable line: Ray wraps the cause in tracebacks; keep the final message."""
    marker = "Message:"
    text = reason.rsplit(marker, 1)[-1] if marker in reason else reason
    text = " ".join(text.replace("\\n", " ").split()).strip(" '>")
    return text if len(text) <= limit else text[: limit - 3] + "..."

