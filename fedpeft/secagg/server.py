"""The coordinator's side of SecAgg+: run a secure round over Flower's Grid and decode only the sum.

A round that starts a key epoch first runs the two set-up exchanges (``epoch.set_up``); a round on an existing
epoch's keys is two exchanges: the masked input (TRAIN), then unmasking. The server never holds an unmasked
individual update: it receives masked ring vectors, and reconstructs, per site, either its round self-mask seed (it
survived: its input is in the sum) or its round masking key (it dropped: its input is not in the sum, only its
pairwise masks must be removed). Both are that round's own secrets (``derive``): nothing reconstructed in one round
opens another. Below the threshold at any stage the round aborts cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes
from fedpeft.config import SecAggConfig
from fedpeft.errors import SecAggAbort
from fedpeft.messaging import Refusal, array_record, as_list, config_record
from fedpeft.secagg.derive import SEED_BYTES, labels, pairwise_seed
from fedpeft.secagg.encoding import (
    decode_sum,
    low_bits,
    packed_size,
    ring_add,
    ring_encoding,
    ring_sub,
    unpack_bits,
)
from fedpeft.secagg.epoch import Epoch, graph_plan, set_up
from fedpeft.secagg.masks import expand_mask, pairwise_mask
from fedpeft.secagg.shamir import combine
from fedpeft.secagg.stages import Stages

MASK_KEY_BYTES = 32


@dataclass
class SecureSum:
    values: np.ndarray  # sum over surviving sites of w * clip(update)
    weight_sum: float  # sum of their normalised weights
    survivors: list[int]  # node ids whose input is in the sum
    train_replies: list[Message]  # masked-input replies: their metrics, and masked vectors that reveal nothing alone
    failures: dict[int, str] = field(default_factory=dict)  # node -> stage and reason
    upload_bytes: list[int] = field(default_factory=list)
    refusals: dict[int, Refusal] = field(default_factory=dict)  # node -> its refusal of the masked-input stage
    ring: np.ndarray | None = None  # integer mode: the sum modulo 2^integer_bits (values/weight_sum unused)


class SecAggRound:
    """One secure-aggregation round among ``nodes``; ``run`` returns the decoded sum or raises SecAggAbort.

    With ``epoch`` (keys set up in an earlier round, covering this one) the round is two exchanges; without, ``run``
    first sets up a key epoch for rounds ``server_round..last_round`` (default: this round only).
    """

    def __init__(self, grid: Grid, nodes: list[int], server_round: int, settings: SecAggConfig, *,
                 timeout: float, integer_bits: int | None = None, epoch: Epoch | None = None,
                 last_round: int | None = None) -> None:
        """``integer_bits``: uploads are integers in Z_2^integer_bits, packed (distributed DP), not fixed-point
        floats; masks are then taken modulo 2^32 and the sum reduced to the sub-ring at the end."""
        self.nodes, self.settings, self.epoch = sorted(nodes), settings, epoch
        self.integer_bits = integer_bits
        self.mask_bits = 32 if integer_bits else settings.bits
        self.round = server_round
        self.last_round = server_round if last_round is None else max(last_round, server_round)
        self.degree, self.threshold = (epoch.degree, epoch.threshold) if epoch else graph_plan(len(nodes), settings)
        self.stages = Stages(grid, server_round, timeout=timeout, threshold=self.threshold)
        self.refusals: dict[int, Refusal] = {}

    @property
    def failures(self) -> dict[int, str]:
        return self.stages.failures

    def collect_masked(self, epoch: Epoch, train_content: RecordDict, participants: set[int],
                       length: int) -> dict[int, Message]:
        """The masked input (the TRAIN message); returns the well-formed masked uploads by index."""
        config = ConfigRecord({**config_record(train_content), wire.SA_EPOCH: epoch.epoch_id,
                               wire.SA_SURVIVORS: sorted(participants)})
        content = RecordDict({wire.ADAPTER: train_content[wire.ADAPTER], wire.CONFIG: config})
        replies = self.stages.exchange({epoch.node_of(i): content for i in participants}, MessageType.TRAIN,
                                       "masked input")
        uploads: dict[int, Message] = {}
        for reply in replies.ok:
            node = reply.metadata.src_node_id
            refusal = Refusal.in_reply(reply)
            if refusal is not None:  # the site said no (policy, budget, keys): not a fault, and not in the sum
                self.refusals[node] = refusal
                continue
            problem = _malformed(reply, length + 1, bits=self.mask_bits, packed_bits=self.integer_bits)
            if problem:
                self.failures[node] = f"masked input: {problem}"
            else:
                uploads[epoch.index[node]] = reply
        return uploads

    def unmask(self, epoch: Epoch, alive: set[int], dropped: set[int]) -> tuple[dict, dict]:
        """Shares of survivors' round self-mask seeds and of dropped sites' round masking keys."""
        contents = {}
        for i in alive:
            senders = sorted(j for j in epoch.graph[i] if j in alive | dropped and j in epoch.inbox.get(i, {}))
            contents[epoch.node_of(i)] = ConfigRecord({
                wire.SERVER_ROUND: self.round, wire.SA_EPOCH: epoch.epoch_id, wire.SA_SURVIVORS: sorted(alive),
                wire.SA_DROPPED: sorted(dropped), wire.SA_FROM: senders,
                wire.SA_CIPHERTEXTS: [epoch.sealed(i, j, self.round) for j in senders]})
        replies = self.stages.send(contents, wire.SECAGG_UNMASK, "unmask")
        seed_shares: dict[int, dict[int, bytes]] = {}
        key_shares: dict[int, dict[int, bytes]] = {}
        for reply in replies.ok:
            holder, config = epoch.index[reply.metadata.src_node_id], config_record(reply.content)
            for owner, share in zip(as_list(config[wire.SA_SELF_MASK_FROM]), as_list(config[wire.SA_SELF_MASK_SHARES]),
                                    strict=True):
                seed_shares.setdefault(int(owner), {})[holder] = bytes(share)
            for owner, share in zip(as_list(config[wire.SA_KEY_FROM]), as_list(config[wire.SA_KEY_SHARES]),
                                    strict=True):
                key_shares.setdefault(int(owner), {})[holder] = bytes(share)
        return seed_shares, key_shares

    def run(self, train_content: RecordDict, length: int) -> SecureSum:
        if self.epoch is None:
            self.epoch = set_up(self.stages, self.nodes, self.settings, first_round=self.round,
                                last_round=self.last_round)
        epoch = self.epoch
        participants = {epoch.index[node] for node in self.nodes if node in epoch.index} & epoch.members
        uploads = self.collect_masked(epoch, train_content, participants, length)
        alive = set(uploads)
        self.stages.require(alive, "masked input")
        dropped = participants - alive
        seed_shares, key_shares = self.unmask(epoch, alive, dropped)
        order = sorted(alive)
        total = self._ring(masked_vector(uploads[order[0]]), length + 1)
        for i in order[1:]:  # one upload deserialized at a time: n x 4 MB per 1M values never coexist
            total = ring_add(total, self._ring(masked_vector(uploads[i]), length + 1))
        total = self._remove_self_masks(total, alive, seed_shares, length + 1)
        total = self._remove_dropped_pairwise(total, epoch, alive, dropped=dropped, shares=key_shares,
                                              length=length + 1)
        sizes = [payload_bytes(uploads[i].content[wire.SA_MASKED]) for i in order]
        survivors, replies = sorted(epoch.node_of(i) for i in alive), [uploads[i] for i in order]
        if self.integer_bits:
            return SecureSum(np.zeros(0), 0.0, survivors, replies, self.failures, sizes, self.refusals,
                             ring=low_bits(total, self.integer_bits))
        decoded = decode_sum(total, ring_encoding(self.settings.clip_range, len(epoch.index), self.settings.bits))
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
            seed = self._reconstruct(shares.get(i, {}), i, "round self-mask seed", SEED_BYTES)
            total = ring_sub(total, expand_mask(seed, length, self.mask_bits, self_label))
        return total

    def _remove_dropped_pairwise(self, total: np.ndarray, epoch: Epoch, alive: set[int], *, dropped: set[int],
                                 shares: dict, length: int) -> np.ndarray:
        _, pair_label = labels(self.round)
        for d in sorted(dropped):
            mask_sk = self._reconstruct(shares.get(d, {}), d, "round masking key", MASK_KEY_BYTES)
            for j in epoch.graph[d]:
                if j in alive:  # j added pairwise_mask(seed, j, d) for its dropped neighbour d
                    seed = pairwise_seed(mask_sk, epoch.mask_pk(j, self.round), epoch.epoch_id, self.round)
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
