"""The SecAgg+ communication graph: each client masks with, and secret-shares to, only its ``degree`` neighbours.

The graph is a Harary-style circulant over a pseudo-random permutation of the clients (Bell et al., CCS 2020, Sec. 3):
every party derives the same graph from the node ids and a public seed. The seed must not be chosen by a malicious
server after it has seen the clients (it could then place its own clients around a victim); derive it from public,
already-fixed data.

Threshold convention (what ``t`` counts): each client splits each of its secrets into ``degree + 1`` Shamir shares,
one for each neighbour and one it keeps itself, and any ``t`` of those ``degree + 1`` shares reconstruct it.
An honest holder reveals, for a given client, either the self-mask share or the key share, never both; for the server
to be unable to collect ``t`` of each from disjoint holders we need ``2 t > degree + 1``. A dropped client's secret
can only come from its surviving neighbours, so ``t <= degree`` is needed to tolerate any dropout at all;
``t = degree + 1`` is allowed but aborts the round on the first dropout.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from typing import Any

from fedpeft.errors import SecAggError

COMPLETE_GRAPH_MAX_CLIENTS = 20
_DOMAIN = b"fedpeft/secagg/graph/v1:"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def default_degree(num_clients: int) -> int:
    """``num_clients - 1`` (complete graph, plain SecAgg) up to 20 clients; else ``2 * ceil(log2 n) + 2``.

    The logarithmic degree follows the asymptotics of SecAgg+ (k = O(log n)); this constant is a pragmatic choice
    for honest-but-curious servers and modest dropout, not the paper's concrete bound, which for a large colluding
    fraction of clients or heavy dropout asks for a larger k (set it explicitly then).
    """
    if not _is_int(num_clients) or num_clients < 2:
        raise SecAggError(f"num_clients={num_clients!r} is invalid; secure aggregation needs an integer >= 2")
    if num_clients <= COMPLETE_GRAPH_MAX_CLIENTS:
        return num_clients - 1
    return min(2 * math.ceil(math.log2(num_clients)) + 2, num_clients - 1)


def default_threshold(degree: int) -> int:
    """The smallest ``t`` with ``2 t > degree + 1``: ``floor((degree + 1) / 2) + 1``.

    For the even degrees of sparse graphs this is ``degree / 2 + 1``; for an odd (complete-graph) degree it is one
    more than ``floor(degree / 2) + 1``, since the holder count ``degree + 1`` is then even.
    """
    if not _is_int(degree) or degree < 1:
        raise SecAggError(f"degree={degree!r} is invalid; it must be an integer >= 1")
    return (degree + 1) // 2 + 1


def _check_graph(num_clients: int, degree: int) -> None:
    if not _is_int(num_clients) or num_clients < 2:
        raise SecAggError(f"num_clients={num_clients!r} is invalid; secure aggregation needs an integer >= 2")
    if not _is_int(degree) or not 1 <= degree <= num_clients - 1:
        raise SecAggError(
            f"degree={degree!r} is invalid for {num_clients} clients; it must be an integer in [1, {num_clients - 1}]"
            f" (use default_degree({num_clients}) = {default_degree(num_clients)})"
        )
    if degree < num_clients - 1 and degree % 2:
        raise SecAggError(
            f"degree={degree} is odd and below num_clients - 1 = {num_clients - 1}; a circulant graph needs an even "
            f"degree: use {degree + 1} or {degree - 1}"
        )


def validate(num_clients: int, degree: int, threshold: int) -> None:
    """:class:`SecAggError` unless the graph can be built and ``(degree + 1) / 2 < threshold <= degree + 1``."""
    _check_graph(num_clients, degree)
    if not _is_int(threshold) or not (degree + 1) < 2 * threshold <= 2 * (degree + 1):
        raise SecAggError(
            f"threshold={threshold!r} is invalid for degree={degree}: it counts shares out of degree + 1 = "
            f"{degree + 1} (neighbours + self) and must satisfy (degree + 1) / 2 < threshold <= degree + 1, "
            f"or the server could learn both secrets of a client; use default_threshold({degree}) = "
            f"{default_threshold(degree)}"
        )


def _permutation(ids: list[int], seed: bytes) -> list[int]:
    prefix = _DOMAIN + len(seed).to_bytes(8, "big") + seed
    # Sorting by a keyed hash gives a uniform pseudo-random order (ties need a SHA-256 collision); ids break ties.
    return sorted(ids, key=lambda i: (hashlib.sha256(prefix + str(i).encode()).digest(), i))


def neighbours(node_ids: Sequence[int], degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each node id -> its ``degree`` neighbours (sorted): symmetric, no self loops, the same for every party.

    ``degree == len(node_ids) - 1`` gives the complete graph; otherwise ``degree`` must be even and each node is linked
    to the ``degree / 2`` nearest nodes on each side of a cycle ordered by a ``seed``-derived permutation.
    """
    ids = list(node_ids)
    for i in ids:
        if not _is_int(i):
            raise SecAggError(f"node id {i!r} is not an integer; pass the clients' node ids")
    if len(set(ids)) != len(ids):
        raise SecAggError(f"node ids contain duplicates ({len(ids) - len(set(ids))} repeated); pass distinct ids")
    if not isinstance(seed, (bytes, bytearray)):
        raise SecAggError(f"graph seed must be bytes, got {type(seed).__name__}")
    n = len(ids)
    _check_graph(n, degree)
    ordered = sorted(int(i) for i in ids)
    if degree == n - 1:
        return {i: tuple(j for j in ordered if j != i) for i in ordered}
    cycle = _permutation(ordered, bytes(seed))
    half = degree // 2
    result: dict[int, tuple[int, ...]] = {}
    for pos, node in enumerate(cycle):
        near = {cycle[(pos + d) % n] for d in range(1, half + 1)} | {cycle[(pos - d) % n] for d in range(1, half + 1)}
        result[node] = tuple(sorted(near))
    return result
