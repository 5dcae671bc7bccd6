"""A site's warm worker: one long-lived process that runs fedpeft's real ClientApp for every message of its site.

``fedpeft client`` starts it beside the SuperNode (``python -m fedpeft.client.worker --socket PATH --site NAME``).
It imports torch and fedpeft once, keeps the per-process Site cache (base model, encoded data) warm across
messages, and answers the thin ClientApp processes (fedpeft.client.proxy) on a Unix socket in the site's state
directory: the directory 0700 and the socket 0600, so only the site's own user can connect (checked again with the
peer's credentials). It never listens on a TCP port. One message is handled at a time: the secure-aggregation node
state and the privacy ledger follow one message after another, as they do with Flower's one process per message.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedpeft import wire
from fedpeft.client.mods import error_reply
from fedpeft.client.proxy import WorkerUnavailable, ping, recv_frames, send_frames

SUMMARY_PREFIX = "fedpeft-site: "  # the agent echoes the worker's lines that start so to its console
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 including the terminating NUL
_KINDS = {wire.SA_MASKED: "masked update", wire.ADAPTER: "adapter update", wire.METRICS: "metrics"}
_SECAGG_KINDS = {wire.SECAGG_KEYS: "public keys", wire.SECAGG_SHARES: "encrypted shares",
                 wire.SECAGG_UNMASK: "unmasking shares"}


def check_socket_path(path: Path) -> None:
    """ValueError naming the path when the kernel could not bind it (Unix socket paths are short)."""
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ValueError(f"the worker socket path {path} is {len(os.fsencode(str(path)))} bytes, over the "
                         f"{MAX_SOCKET_PATH} a Unix socket allows; set [site] state_dir in site.toml to a shorter "
                         "directory (e.g. /srv/fedpeft/state)")


def model_loads() -> int:
    """How many times this process loaded a base model (the Site cache's misses)."""
    from fedpeft.client.site import shared_model

    return shared_model.cache_info().misses


class Worker:
    """fedpeft's ClientApp (with its mods) behind a lock, and what it has done."""

    def __init__(self, site: str) -> None:
        from fedpeft.client.app import build_client_app

        self.site = site
        self.app = build_client_app()  # never the forwarding app: this process is where messages end
        self.lock = threading.Lock()
        self.handled = 0

    def status(self) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "handled": self.handled, "model_loads": model_loads()}

    def handle(self, message_bytes: bytes, context_bytes: bytes,
               task: dict[str, int | None] | None = None) -> tuple[dict[str, Any], list[bytes]]:
        message = message_from_proto(ProtoMessage.FromString(message_bytes))
        context = context_from_proto(ProtoContext.FromString(context_bytes))
        with self.lock:
            started = time.monotonic()
            _as_task(task or {})
            reply = self._run(message, context)
            self.handled += 1
            seconds = time.monotonic() - started
        reply_bytes = message_to_proto(reply).SerializeToString()
        line = summary(self.site, message, reply, size=len(reply_bytes), seconds=seconds)
        print(SUMMARY_PREFIX + line, flush=True)
        header = {**self.status(), "summary": line}
        return header, [reply_bytes, context_to_proto(context).SerializeToString()]

    def _run(self, message: Message, context: Context) -> Message:
        try:
            return self.app(message, context)
        except Exception as ex:  # past the app's own mods (e.g. in a mod itself): the reply Flower would make
            return error_reply(message, ex)


def _as_task(task: dict[str, int | None]) -> None:
    """Run under the forwarding process's Flower task identity, as the handlers would in that process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in task.items():
        if name in ("task_id", "run_id", "node_id"):
            setattr(TaskIdentity, f"_{name}", value)


def summary(site: str, message: Message, reply: Message, *, size: int, seconds: float) -> str:
    """One line per message for the site's console: the round, what left (kind and bytes) and ε under DP."""
    server_round = _config_value(message, wire.SERVER_ROUND)
    where = f"round {server_round}" if server_round is not None else "no round"
    text = f"site '{site}': {where} {message.metadata.message_type}: sent {_what_left(reply)}, {size:,} bytes"
    epsilon = _metric(reply, wire.EPSILON)
    if epsilon is not None:
        text += f"; epsilon {epsilon:.3f}"
    return text + f" ({seconds:.1f} s)"


def _config_value(message: Message, key: str) -> Any:
    if not message.has_content():
        return None
    return next((record[key] for record in message.content.config_records.values() if key in record), None)


def _metric(reply: Message, key: str) -> float | None:
    if reply.has_error() or wire.METRICS not in reply.content.metric_records:
        return None
    value = reply.content.metric_records[wire.METRICS].get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _what_left(reply: Message) -> str:
    if reply.has_error():
        return f"an error ({(reply.error.reason or '')[:160]})"
    rule = _config_value(reply, wire.REFUSAL_RULE)
    if rule is not None:
        return f"a refusal (rule {rule})"
    if reply.metadata.message_type in _SECAGG_KINDS:
        return _SECAGG_KINDS[reply.metadata.message_type]
    return " + ".join(_KINDS.get(name, name) for name in reply.content) or "an empty reply"


def bind(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``: its directory 0700, the socket 0600; a stale socket is replaced, a live
    worker's is not (a second agent for the same site would mix two sites' state)."""
    check_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.is_socket():
        try:
            status = ping(str(path))
        except WorkerUnavailable:
            path.unlink()  # left by a worker that was killed
        else:
            raise RuntimeError(f"another worker (pid {status.get('pid')}) already serves {path}: is a second "
                               "`fedpeft client` running for this site? Stop it first")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600 from the start: no moment in which others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _same_user(conn: socket.socket) -> bool:
    if not hasattr(socket, "SO_PEERCRED"):
        return True  # the 0600 socket in a 0700 directory is the guard where the kernel does not say
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


def _serve_connection(worker: Worker, conn: socket.socket) -> None:
    with conn:
        try:
            if not _same_user(conn):
                print("refused a connection from another user", file=sys.stderr, flush=True)
                return
            (head,) = recv_frames(conn, 1)
            request = json.loads(head)
            if request.get("op") == "handle":
                message_bytes, context_bytes = recv_frames(conn, 2)
                header, frames = worker.handle(message_bytes, context_bytes, task=request.get("task"))
            else:
                header, frames = worker.status(), []
            send_frames(conn, [json.dumps(header).encode(), *frames])
        except (ConnectionError, OSError) as err:  # the ClientApp process went away; the next one will come
            print(f"connection dropped: {err}", file=sys.stderr, flush=True)


def serve(path: Path, site: str) -> None:
    """Import the heavy stack, then answer until SIGTERM; the socket file goes with the worker."""
    import fedpeft.client.site  # noqa: F401  (torch, transformers, peft: paid once, before the first message)

    worker = Worker(site)
    listener = bind(path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fedpeft worker for site '{site}' (pid {os.getpid()}) listening on {path}", flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve_connection, args=(worker, conn), daemon=True).start()
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.client.worker",
                                     description="A site's warm ClientApp worker (started by `fedpeft client`).")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--site", default="site", help="the site's name, for its console lines")
    args = parser.parse_args(argv)
    try:
        serve(Path(args.socket), args.site)
    except (ValueError, RuntimeError) as err:
        print(f"fedpeft worker: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
