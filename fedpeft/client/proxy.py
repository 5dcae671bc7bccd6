"""The thin side of a deployed site's ClientApp: forward each Flower message to the site's warm worker.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message, and each would import torch and load the
base model again (a deployed round cost 5-10x a simulated one). ``fedpeft client`` therefore keeps one long-lived
worker per site (fedpeft.client.worker) and names its Unix socket in the node config; the ClientApp process then
only serialises the Message and the Context with Flower's own protobuf serde, sends them over the socket, and hands
the worker's reply and updated Context back to Flower. This module must stay light: no torch, no fedpeft models.

A missing or dead worker is an error reply naming the socket, never a silent in-process fallback: that would hide
the slowness the worker exists to remove and load a second copy of the model next to the worker's.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedpeft import wire
from fedpeft.messaging import without_paths

_LENGTH = struct.Struct(">Q")  # every frame: an 8-byte big-endian length, then that many bytes
MAX_FRAME = 8 << 30  # a sanity bound against a garbled length prefix, far above any adapter
CONNECT_WAIT = 180.0  # seconds to wait for a worker that (re)starts: importing torch takes a while on busy cores
RESTART_FIX = "restart `fedpeft client` for this site (its agent starts the worker), and see worker.log beside it"


class WorkerUnavailable(Exception):
    """The worker could not be reached, or ended before it answered."""


def send_frames(sock: socket.socket, frames: list[bytes]) -> None:
    sock.sendall(b"".join(_LENGTH.pack(len(frame)) + frame for frame in frames))


def recv_frames(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` frames; ConnectionError when the peer closes before they are complete."""
    frames = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
        if length > MAX_FRAME:
            raise ConnectionError(f"frame of {length} bytes announced: not a fedpeft worker peer")
        frames.append(_recv_exact(sock, length))
    return frames


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def connect(path: str, wait: float = CONNECT_WAIT) -> socket.socket:
    """A connection to the worker at ``path``, waiting up to ``wait`` seconds while it is absent or starting."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            # the agent keeps the socket's directory while it restarts a worker; without it no worker is coming
            if time.monotonic() >= deadline or not os.path.isdir(os.path.dirname(path) or "."):
                raise WorkerUnavailable(f"no worker listens on {path} ({err.strerror}, waited {wait:.0f} s)") from None
        except OSError as err:  # e.g. permission denied: another user's socket, or a path that is not one
            sock.close()
            raise WorkerUnavailable(f"cannot connect to the worker socket {path} ({err.strerror})") from None
        time.sleep(0.5)


def request(path: str, header: dict[str, Any], body: Sequence[bytes] = (), *,
            wait: float = CONNECT_WAIT, replies: int = 3) -> tuple[dict[str, Any], list[bytes]]:
    """One exchange with the worker: a JSON header and body frames out, a JSON header and frames back."""
    with connect(path, wait) as sock:
        try:
            send_frames(sock, [json.dumps(header).encode(), *body])
            head, *frames = recv_frames(sock, replies)
        except (ConnectionError, OSError) as err:
            raise WorkerUnavailable(f"the worker on {path} ended before it answered ({err})") from None
    return json.loads(head), frames


def ping(path: str, wait: float = 0.0) -> dict[str, Any]:
    """The worker's status (pid, model loads, messages handled); WorkerUnavailable if it does not answer."""
    header, _ = request(path, {"op": "ping"}, wait=wait, replies=1)
    return header


def call_worker(path: str, message: Message, context: Context) -> tuple[Message, Context, dict[str, Any]]:
    """The worker's reply to ``message``, the Context after it (node state included) and its status header."""
    body = [message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()]
    header, (reply, state) = request(path, {"op": "handle", "task": _task_identity()}, body)
    return (message_from_proto(ProtoMessage.FromString(reply)),
            context_from_proto(ProtoContext.FromString(state)), header)


def _task_identity() -> dict[str, int | None]:
    """Flower's identity of this ClientApp task (flwr-clientapp sets it), for the worker to run under."""
    from flwr.supercore.task_identity import TaskIdentity

    return {name: getattr(TaskIdentity, f"_{name}", None) for name in ("task_id", "run_id", "node_id")}


def forward_to_worker(message: Message, context: Context, call_next: Any) -> Message:
    """Client mod (outermost): with a worker socket in the node config, the worker answers; without one (simulation,
    ``flwr run`` on a laptop) the ClientApp's own handlers run in this process, as they always did."""
    path = context.node_config.get(wire.NODE_WORKER_SOCKET)
    if not path:
        return call_next(message, context)
    exit_when_orphaned()
    try:
        reply, after, _ = call_worker(str(path), message, context)
    except WorkerUnavailable as err:
        reason = (f"fedpeft site worker unavailable: {err}. The site did not answer this message; {RESTART_FIX} "
                  f"(node config {wire.NODE_WORKER_SOCKET} = {path})")
        print(reason, file=sys.stderr, flush=True)  # lands in the SuperNode's log, i.e. the agent's: with paths
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=without_paths(reason)),
                       reply_to=message)
    context.state = after.state  # Flower pushes this Context object back: the node state the handlers wrote
    return reply


ORPHAN_GRACE = 10.0  # seconds Flower's own parent monitor gets to end this process before the watchdog does


def exit_when_orphaned(poll: float = 1.0, grace: float = ORPHAN_GRACE) -> threading.Thread:
    """End this ClientApp process if the process that started it dies. Flower's own monitor raises SIGINT, whose
    exit handlers try to report to the dead SuperNode and can block for ever: killed agents left such processes
    behind, ~120 MB each. A daemon thread; the exit is hard because nothing is left to report to."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, name="fedpeft-orphan-watchdog", daemon=True)
    thread.start()
    return thread
