"""The coordinator's side of SecAgg+: run the four stages over Flower's Grid and decode only the sum.

The server never holds an unmasked individual update: it receives masked ring vectors, and reconstructs, per site,
either its self-mask seed (it survived: its input is in the sum) or its masking key (it dropped: its input is not in
the sum, only its pairwise masks must be removed). Below the threshold at any stage the round aborts cleanly.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes
from fedpeft.config import SecAggConfig
from fedpeft.errors import SecAggAbort, SecAggError
from fedpeft.messaging import Refusal, Replies, array_record, as_bytes, as_list, config_record, exchange
from fedpeft.secagg.client import MASK_INFO, SEED_BYTES, labels
from fedpeft.secagg.encoding import (
    decode_sum,
    low_bits,
    packed_size,
    ring_add,
    ring_encoding,
    ring_sub,
    unpack_bits,
)
from fedpeft.secagg.graph import default_degree, default_threshold, neighbours, validate
from fedpeft.secagg.keys import agree
from fedpeft.secagg.masks import expand_mask, pairwise_mask
from fedpeft.secagg.shamir import combine

MASK_KEY_BYTES = 32


@dataclass
class SecureSum:
    values: np.ndarray  # sum over surviving sites of w * clip(update)
    weight_sum: float  # sum of their normalised weights
    survivors: list[int]  # node ids whose input is in the sum
    train_replies: list[Message]  # stage-3 replies: their metrics, and masked vectors that reveal nothing alone
    failures: dict[int, str] = field(default_factory=dict)  # node -> stage and reason
    upload_bytes: list[int] = field(default_factory=list)
    refusals: dict[int, Refusal] = field(default_factory=dict)  # node -> its refusal of the masked-input stage
    ring: np.ndarray | None = None  # integer mode: the sum modulo 2^integer_bits (values/weight_sum unused)


class SecAggRound:
    """One secure-aggregation round among ``nodes``; ``run`` returns the decoded sum or raises SecAggAbort."""

    def __init__(self, grid: Grid, nodes: list[int], server_round: int, settings: SecAggConfig, *,
                 timeout: float, integer_bits: int | None = None) -> None:
        """``integer_bits``: uploads are integers in Z_2^integer_bits, packed (distributed DP), not fixed-point
        floats; masks are then taken modulo 2^32 and the sum reduced to the sub-ring at the end."""
        self.grid, self.settings, self.timeout = grid, settings, timeout
        self.integer_bits = integer_bits
        self.mask_bits = 32 if integer_bits else settings.bits
        self.round = server_round
        self.index = {node: i + 1 for i, node in enumerate(sorted(nodes))}
        self.node_of = {i: node for node, i in self.index.items()}
        n = len(nodes)
        self.degree = min(settings.degree or default_degree(n), n - 1)
        self.threshold = settings.threshold or default_threshold(self.degree)
        validate(n, self.degree, self.threshold)
        self.failures: dict[int, str] = {}
        self.refusals: dict[int, Refusal] = {}

    def _send(self, contents: dict[int, ConfigRecord], message_type: str, stage: str) -> Replies:
        replies = exchange(self.grid, {node: RecordDict({wire.CONFIG: c}) for node, c in contents.items()},
                           message_type, str(self.round), timeout=self.timeout)
        self.failures.update({node: f"{stage}: {reason}" for node, reason in replies.failed.items()})
        return replies

    def _require(self, survivors: Collection[int], stage: str) -> None:
        if len(survivors) < self.threshold:
            why = "; ".join(f"site node {node}: {reason}" for node, reason in list(self.failures.items())[:3])
            raise SecAggAbort(f"round {self.round}: only {len(survivors)} sites completed {stage}, below the "
                              f"threshold {self.threshold}; nothing is decoded and the global adapter stays"
                              + (f" ({why})" if why else ""))

    def advertise_keys(self) -> dict[int, tuple[bytes, bytes]]:
        base = {wire.SERVER_ROUND: self.round, wire.SA_NUM: len(self.index), wire.SA_THRESHOLD: self.threshold}
        replies = self._send({node: ConfigRecord({**base, wire.SA_INDEX: i}) for node, i in self.index.items()},
                             wire.SECAGG_KEYS, "advertise keys")
        keys = {self.index[r.metadata.src_node_id]: (as_bytes(config_record(r.content)[wire.SA_CHANNEL_PK]),
                                                      as_bytes(config_record(r.content)[wire.SA_MASK_PK]))
                for r in replies.ok}
        self._require(keys, "advertise keys")
        return keys

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> tuple[dict, dict[int, dict[int, bytes]]]:
        """Returns (the neighbour graph over stage-1 survivors, ciphertexts[recipient][sender])."""
        degree = min(self.degree, len(keys) - 1)
        graph = neighbours(sorted(keys), degree, os.urandom(32))
        contents = {self.node_of[i]: ConfigRecord({
            wire.SERVER_ROUND: self.round, wire.SA_NEIGHBOURS: list(graph[i]),
            wire.SA_NEIGHBOUR_CHANNEL_PKS: [keys[j][0] for j in graph[i]],
            wire.SA_NEIGHBOUR_MASK_PKS: [keys[j][1] for j in graph[i]]}) for i in keys}
        replies = self._send(contents, wire.SECAGG_SHARES, "share keys")
        inbox: dict[int, dict[int, bytes]] = {}
        for reply in replies.ok:
            sender = self.index[reply.metadata.src_node_id]
            config = config_record(reply.content)
            for receiver, sealed in zip(as_list(config[wire.SA_TO]), as_list(config[wire.SA_CIPHERTEXTS]), strict=True):
                if int(receiver) not in graph[sender]:
                    raise SecAggError(f"site {sender} sent a share to {receiver}, which is not its neighbour")
                inbox.setdefault(int(receiver), {})[sender] = bytes(sealed)
        survivors = {self.index[r.metadata.src_node_id] for r in replies.ok}
        self._require(survivors, "share keys")
        return {i: tuple(j for j in graph[i]) for i in survivors}, inbox

    def collect_masked(self, train_content: RecordDict, survivors: set[int], length: int) -> dict[int, Message]:
        """Stage 3: the TRAIN message; returns the well-formed masked uploads by index."""
        config = ConfigRecord({**config_record(train_content), wire.SA_SURVIVORS: sorted(survivors)})
        content = RecordDict({wire.ADAPTER: train_content[wire.ADAPTER], wire.CONFIG: config})
        replies = exchange(self.grid, {self.node_of[i]: content for i in survivors}, MessageType.TRAIN,
                           str(self.round), timeout=self.timeout)
        self.failures.update({node: f"masked input: {reason}" for node, reason in replies.failed.items()})
        uploads: dict[int, Message] = {}
        for reply in replies.ok:
            node = reply.metadata.src_node_id
            refusal = Refusal.in_reply(reply)
            if refusal is not None:  # the site said no (policy, budget): not a fault, and not in the sum
                self.refusals[node] = refusal
                continue
            problem = _malformed(reply, length + 1, bits=self.mask_bits, packed_bits=self.integer_bits)
            if problem:
                self.failures[node] = f"masked input: {problem}"
            else:
                uploads[self.index[node]] = reply
        return uploads

    def unmask(self, graph: dict, inbox: dict, alive: set[int], dropped: set[int]) -> tuple[dict, dict]:
        """Stage 4: shares of survivors' self-mask seeds and of dropped sites' masking keys."""
        contents = {}
        for i in alive:
            senders = sorted(j for j in inbox.get(i, {}) if j in alive | dropped)
            contents[self.node_of[i]] = ConfigRecord({
                wire.SERVER_ROUND: self.round, wire.SA_SURVIVORS: sorted(alive), wire.SA_DROPPED: sorted(dropped),
                wire.SA_FROM: senders, wire.SA_CIPHERTEXTS: [inbox[i][j] for j in senders]})
        replies = self._send(contents, wire.SECAGG_UNMASK, "unmask")
        seed_shares: dict[int, dict[int, bytes]] = {}
        key_shares: dict[int, dict[int, bytes]] = {}
        for reply in replies.ok:
            holder, config = self.index[reply.metadata.src_node_id], config_record(reply.content)
            for owner, share in zip(as_list(config[wire.SA_SELF_MASK_FROM]), as_list(config[wire.SA_SELF_MASK_SHARES]),
                                    strict=True):
                seed_shares.setdefault(int(owner), {})[holder] = bytes(share)
            for owner, share in zip(as_list(config[wire.SA_KEY_FROM]), as_list(config[wire.SA_KEY_SHARES]),
                                    strict=True):
                key_shares.setdefault(int(owner), {})[holder] = bytes(share)
        return seed_shares, key_shares

    def run(self, train_content: RecordDict, length: int) -> SecureSum:
        keys = self.advertise_keys()
        graph, inbox = self.share_keys(keys)
        uploads = self.collect_masked(train_content, set(graph), length)
        alive = set(uploads)
        self._require(alive, "masked input")
        dropped = set(graph) - alive
        seed_shares, key_shares = self.unmask(graph, inbox, alive, dropped)
        order = sorted(alive)
        total = self._ring(masked_vector(uploads[order[0]]), length + 1)
        for i in order[1:]:  # one upload deserialized at a time: n x 4 MB per 1M values never coexist
            total = ring_add(total, self._ring(masked_vector(uploads[i]), length + 1))
        total = self._remove_self_masks(total, alive, seed_shares, length + 1)
        total = self._remove_dropped_pairwise(total, graph, keys, alive, dropped=dropped, shares=key_shares,
                                              length=length + 1)
        sizes = [payload_bytes(uploads[i].content[wire.SA_MASKED]) for i in sorted(alive)]
        survivors, replies = sorted(self.node_of[i] for i in alive), [uploads[i] for i in sorted(alive)]
        if self.integer_bits:
            return SecureSum(np.zeros(0), 0.0, survivors, replies, self.failures, sizes, self.refusals,
                             ring=low_bits(total, self.integer_bits))
        decoded = decode_sum(total, ring_encoding(self.settings.clip_range, len(self.index), self.settings.bits))
        return SecureSum(decoded[:-1], float(decoded[-1]), survivors, replies, self.failures, sizes, self.refusals)

    def _ring(self, upload: np.ndarray, length: int) -> np.ndarray:
        """An upload as ring elements: packed integers are unpacked into Z_2^32 words."""
        return unpack_bits(upload, self.integer_bits, length) if self.integer_bits else upload

    def _reconstruct(self, shares: dict[int, bytes], owner: int, what: str, length: int) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggAbort(f"round {self.round}: only {len(shares)} shares of site {owner}'s {what}, below the "
                              f"threshold {self.threshold}; nothing is decoded")
        return combine(shares, self.threshold, length)

    def _remove_self_masks(self, total: np.ndarray, alive: set[int], shares: dict, length: int) -> np.ndarray:
        self_label, _ = labels(self.round)
        for i in sorted(alive):
            seed = self._reconstruct(shares.get(i, {}), i, "self-mask seed", SEED_BYTES)
            total = ring_sub(total, expand_mask(seed, length, self.mask_bits, self_label))
        return total

    def _remove_dropped_pairwise(self, total: np.ndarray, graph: dict, keys: dict, alive: set[int], *,
                                 dropped: set[int], shares: dict, length: int) -> np.ndarray:
        _, pair_label = labels(self.round)
        for d in sorted(dropped):
            mask_sk = self._reconstruct(shares.get(d, {}), d, "masking key", MASK_KEY_BYTES)
            for j in graph[d]:
                if j in alive:  # j added pairwise_mask(seed, j, d) for its dropped neighbour d
                    seed = agree(mask_sk, keys[j][1], MASK_INFO)
                    total = ring_sub(total, pairwise_mask(seed, j, d, length, bits=self.mask_bits,
                                                              label=pair_label))
        return total


def masked_vector(reply: Message) -> np.ndarray:
    """The one thing the server reads from a site's stage-3 upload: its masked ring vector."""
    return array_record(reply.content, wire.SA_MASKED)[wire.SA_MASKED].numpy()


def _malformed(reply: Message, length: int, *, bits: int, packed_bits: int | None = None) -> str | None:
    """Why a stage-3 reply (not a refusal) is not a usable masked upload, or None."""
    record = reply.content.get(wire.SA_MASKED)
    if not isinstance(record, ArrayRecord) or wire.SA_MASKED not in record:
        return "no masked vector in the reply"
    array = record[wire.SA_MASKED]
    dtype = "uint8" if packed_bits else f"uint{bits}"
    if packed_bits:
        length = packed_size(length, packed_bits)
    if array.dtype != dtype or tuple(array.shape) != (length,):
        return f"masked vector has dtype {array.dtype} and shape {tuple(array.shape)}, expected {dtype} ({length},)"
    return None
