"""The coordinator's key set-up: one key epoch (two exchanges) serves rounds ``first..last`` of its sites.

The server numbers the sampled sites 1..n, collects their channel keys and every epoch round's public masking keys,
builds the neighbour graph over those that answered, and holds the sealed shares it cannot read, to forward one
round's at a time in that round's unmasking exchange.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message

from fedpeft import wire
from fedpeft.config import SecAggConfig
from fedpeft.messaging import as_bytes, as_list, config_record
from fedpeft.secagg.derive import EPOCH_ID_BYTES, PK_BYTES, key_of_round
from fedpeft.secagg.graph import default_degree, default_threshold, neighbours, validate
from fedpeft.secagg.stages import Stages


@dataclass(frozen=True)
class Epoch:
    """What the server keeps of one key epoch: public keys, the graph and the sealed shares, no secret."""

    epoch_id: bytes = field(repr=False)
    index: Mapping[int, int]  # node id -> 1..n
    first_round: int
    last_round: int
    degree: int
    threshold: int
    graph: Mapping[int, tuple[int, ...]]  # the members (sites that completed the set-up) -> their neighbours
    mask_pks: Mapping[int, bytes] = field(repr=False)  # index -> the public masking key of each round, concatenated
    inbox: Mapping[int, Mapping[int, tuple[bytes, ...]]] = field(repr=False)  # recipient -> sender -> one per round

    @property
    def members(self) -> set[int]:
        return set(self.graph)

    def node_of(self, i: int) -> int:
        return next(node for node, j in self.index.items() if j == i)

    def covers(self, nodes: Collection[int], server_round: int) -> bool:
        """Whether a round of ``nodes`` can run on this epoch's keys: the round is in the epoch and the sampled sites
        are exactly its members (a new site, or one that missed the set-up, needs a new epoch)."""
        return self.first_round <= server_round <= self.last_round and \
            {self.index.get(node) for node in nodes} == self.members

    def mask_pk(self, i: int, server_round: int) -> bytes:
        return key_of_round(self.mask_pks[i], self.first_round, server_round)

    def sealed(self, recipient: int, sender: int, server_round: int) -> bytes:
        return self.inbox[recipient][sender][server_round - self.first_round]


def graph_plan(num_sites: int, settings: SecAggConfig) -> tuple[int, int]:
    """(degree, threshold) for ``num_sites`` sites: SecAggConfig's values or the SecAgg+ defaults; checked."""
    degree = min(settings.degree or default_degree(num_sites), num_sites - 1)
    threshold = settings.threshold or default_threshold(degree)
    validate(num_sites, degree, threshold)
    return degree, threshold


def set_up(stages: Stages, nodes: Collection[int], settings: SecAggConfig, *, first_round: int,
           last_round: int) -> Epoch:
    """Run the two set-up exchanges among ``nodes``; SecAggAbort (from ``stages``) below the threshold."""
    index = {node: i + 1 for i, node in enumerate(sorted(nodes))}
    degree, threshold = graph_plan(len(index), settings)
    epoch_id = os.urandom(EPOCH_ID_BYTES)
    rounds = last_round - first_round + 1
    base: dict[str, int | bytes] = {
        wire.SERVER_ROUND: stages.round, wire.SA_EPOCH: epoch_id, wire.SA_FIRST_ROUND: first_round,
        wire.SA_LAST_ROUND: last_round, wire.SA_NUM: len(index), wire.SA_THRESHOLD: threshold}
    replies = stages.send({node: ConfigRecord({**base, wire.SA_INDEX: i}) for node, i in index.items()},
                          wire.SECAGG_KEYS, "advertise keys")
    keys = {}
    for reply in replies.ok:
        node, config = reply.metadata.src_node_id, config_record(reply.content)
        channel_pk, mask_pks = as_bytes(config[wire.SA_CHANNEL_PK]), as_bytes(config[wire.SA_MASK_PK])
        if len(channel_pk) == PK_BYTES and len(mask_pks) == rounds * PK_BYTES:
            keys[index[node]] = (channel_pk, mask_pks)
        else:
            stages.failures[node] = "advertise keys: public keys of the wrong size"
    stages.require(keys, "advertise keys")
    graph = neighbours(sorted(keys), min(degree, len(keys) - 1), os.urandom(32))
    node_of = {i: node for node, i in index.items()}
    contents = {node_of[i]: ConfigRecord({
        wire.SERVER_ROUND: stages.round, wire.SA_EPOCH: epoch_id, wire.SA_NEIGHBOURS: list(graph[i]),
        wire.SA_NEIGHBOUR_CHANNEL_PKS: [keys[j][0] for j in graph[i]],
        wire.SA_NEIGHBOUR_MASK_PKS: [keys[j][1] for j in graph[i]]}) for i in keys}
    replies = stages.send(contents, wire.SECAGG_SHARES, "share keys")
    inbox: dict[int, dict[int, tuple[bytes, ...]]] = {}
    for reply in replies.ok:
        sender = index[reply.metadata.src_node_id]
        sealed = _sealed_by_recipient(reply, graph[sender], rounds)
        if sealed is None:
            stages.failures[reply.metadata.src_node_id] = "share keys: shares for other sites than its neighbours"
            continue
        for receiver, blobs in sealed.items():
            inbox.setdefault(receiver, {})[sender] = blobs
    members = {index[r.metadata.src_node_id] for r in replies.ok if r.metadata.src_node_id not in stages.failures}
    stages.require(members, "share keys")
    return Epoch(epoch_id=epoch_id, index=index, first_round=first_round, last_round=last_round, degree=degree,
                 threshold=threshold, graph={i: graph[i] for i in members},
                 mask_pks={i: keys[i][1] for i in members}, inbox=inbox)


def _sealed_by_recipient(reply: Message, neighbours_of: tuple[int, ...],
                         rounds: int) -> dict[int, tuple[bytes, ...]] | None:
    """A share reply's ciphertexts by recipient (one per round), or None when it is not one per neighbour and round."""
    config = config_record(reply.content)
    receivers = [int(j) for j in as_list(config[wire.SA_TO])]
    blobs = [bytes(b) for b in as_list(config[wire.SA_CIPHERTEXTS])]
    if sorted(receivers) != sorted(neighbours_of) or len(blobs) != rounds * len(receivers):
        return None
    return {j: tuple(blobs[k * rounds: (k + 1) * rounds]) for k, j in enumerate(receivers)}
