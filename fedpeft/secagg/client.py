"""The site's side of SecAgg+ (Bell et al., CCS 2020) on Flower's Message API.

Stage 1 (keys): make a channel key pair, a masking key pair and a self-mask seed; keep them in node state.
Stage 2 (shares): Shamir-share the masking private key and the self-mask seed among the neighbours, each share
    encrypted and authenticated for its recipient.
Stage 3 (masked input, the TRAIN message): encode w*x and w in the ring, add the self mask and one pairwise mask
    per surviving neighbour; only this leaves the site.
Stage 4 (unmask): for each neighbour, reveal either its self-mask share (it survived) or its masking-key share
    (it dropped) -- never both for the same neighbour.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpeft import wire
from fedpeft.errors import SecAggError
from fedpeft.messaging import as_bytes, as_int, as_list, config_record
from fedpeft.secagg.encoding import encode, low_bits, pack_bits, ring_add, ring_encoding
from fedpeft.secagg.keys import agree, generate_keypair, open_sealed, seal
from fedpeft.secagg.masks import expand_mask, pairwise_mask
from fedpeft.secagg.shamir import split

CHANNEL_INFO = b"fedpeft-secagg-channel"
MASK_INFO = b"fedpeft-secagg-pairwise"
SEED_BYTES = 32
SHARE_BYTES = 66
SA_MIN_COHORT = "min-cohort"  # node state: the fewest sites this site's noise share was calibrated to


def _state(context: Context) -> ConfigRecord:
    if wire.SA_STATE not in context.state:
        raise SecAggError("secure aggregation: this site holds no keys for the round (it missed stage 1)")
    return config_record(context.state, wire.SA_STATE)


def _check_round(state: ConfigRecord, config: ConfigRecord) -> int:
    server_round, keys_round = as_int(config[wire.SERVER_ROUND]), as_int(state[wire.SERVER_ROUND])
    if keys_round != server_round:
        raise SecAggError(f"secure aggregation: keys are for round {keys_round}, the message for "
                          f"round {server_round}")
    return server_round


def aad(server_round: int, sender: int, receiver: int) -> bytes:
    return f"fedpeft-secagg|{server_round}|{sender}|{receiver}".encode()


def labels(server_round: int) -> tuple[bytes, bytes]:
    """Mask-expansion labels (self, pairwise): a seed never expands to the same mask in two rounds."""
    return f"self|{server_round}".encode(), f"pair|{server_round}".encode()


def handle_keys(msg: Message, context: Context) -> Message:
    config = config_record(msg.content)
    channel, masking = generate_keypair(), generate_keypair()
    context.state[wire.SA_STATE] = ConfigRecord({
        wire.SERVER_ROUND: as_int(config[wire.SERVER_ROUND]), wire.SA_INDEX: as_int(config[wire.SA_INDEX]),
        wire.SA_NUM: as_int(config[wire.SA_NUM]), wire.SA_THRESHOLD: as_int(config[wire.SA_THRESHOLD]),
        "channel-sk": channel.private, "mask-sk": masking.private, "self-seed": os.urandom(SEED_BYTES)})
    reply = ConfigRecord({wire.SA_CHANNEL_PK: channel.public, wire.SA_MASK_PK: masking.public})
    return Message(RecordDict({wire.CONFIG: reply}), reply_to=msg)


def handle_shares(msg: Message, context: Context) -> Message:
    config, state = config_record(msg.content), _state(context)
    server_round, me = _check_round(state, config), as_int(state[wire.SA_INDEX])
    neighbours = [int(j) for j in as_list(config[wire.SA_NEIGHBOURS])]
    state[wire.SA_NEIGHBOURS] = neighbours
    state[wire.SA_NEIGHBOUR_MASK_PKS] = list(as_list(config[wire.SA_NEIGHBOUR_MASK_PKS]))
    state[wire.SA_NEIGHBOUR_CHANNEL_PKS] = list(as_list(config[wire.SA_NEIGHBOUR_CHANNEL_PKS]))
    threshold = as_int(state[wire.SA_THRESHOLD])
    holders = [*neighbours, me]  # shares are held by the neighbours and the site itself (degree + 1 holders)
    key_shares = split(as_bytes(state["mask-sk"]), threshold, holders)
    seed_shares = split(as_bytes(state["self-seed"]), threshold, holders)
    state["own-seed-share"] = seed_shares[me]  # the own masking-key share is never revealed: it is alive
    sealed = []
    for j, channel_pk in zip(neighbours, as_list(config[wire.SA_NEIGHBOUR_CHANNEL_PKS]), strict=True):
        key = agree(as_bytes(state["channel-sk"]), bytes(channel_pk), CHANNEL_INFO + struct.pack(">I", server_round))
        plaintext = struct.pack(">II", me, j) + key_shares[j] + seed_shares[j]
        sealed.append(seal(key, plaintext, aad(server_round, me, j)))
    reply = ConfigRecord({wire.SA_TO: neighbours, wire.SA_CIPHERTEXTS: sealed})
    return Message(RecordDict({wire.CONFIG: reply}), reply_to=msg)


def masked_upload(config: ConfigRecord, context: Context, values: np.ndarray, weight: float, *, clip_range: float,
                  bits: int) -> ArrayRecord:
    """Stage 3: the ring-encoded, masked (weight * clip(values), weight); ``weight`` is already in [0, 1]."""
    state = _state(context)
    server_round, me = _check_round(state, config), as_int(state[wire.SA_INDEX])
    survivors = {int(j) for j in as_list(config[wire.SA_SURVIVORS])}
    if not 0.0 <= weight <= 1.0:
        raise SecAggError(f"secure aggregation: normalised weight {weight} is outside [0, 1]; raise "
                          "secagg.max_weight above the largest site weight")
    clipped = np.clip(np.asarray(values, dtype=np.float64), -clip_range, clip_range)
    vector = np.concatenate([weight * clipped, [weight]])
    encoding = ring_encoding(clip_range, as_int(state[wire.SA_NUM]), bits)
    masked = _masked(encode(vector, encoding), state, server_round, me, survivors=survivors, bits=bits)
    state[wire.SA_SURVIVORS] = sorted(survivors)
    return ArrayRecord({wire.SA_MASKED: Array(masked)})


def masked_integers(config: ConfigRecord, context: Context, values: np.ndarray, *, bits: int,
                    min_cohort: int = 0) -> ArrayRecord:
    """Stage 3 for integer values (distributed DP): ``values`` (int64, already the site's noisy integer sum) in the
    sub-ring Z_2^bits of Z_2^32, masked, and packed at ``bits`` bits a value.

    The masks are the float path's (uniform over Z_2^32, so uniform over Z_2^bits once reduced) and cancel in the
    sum modulo 2^32, hence modulo 2^bits. ``min_cohort``: this site reveals its unmasking shares only when at least
    that many sites are in the sum (its noise share is calibrated to that many shares).
    """
    state = _state(context)
    server_round, me = _check_round(state, config), as_int(state[wire.SA_INDEX])
    survivors = {int(j) for j in as_list(config[wire.SA_SURVIVORS])}
    masked = _masked(np.asarray(values, dtype=np.int64).astype(np.uint32), state, server_round, me,
                     survivors=survivors, bits=32)
    state[wire.SA_SURVIVORS] = sorted(survivors)
    state[SA_MIN_COHORT] = int(min_cohort)
    return ArrayRecord({wire.SA_MASKED: Array(pack_bits(low_bits(masked, bits), bits))})


def _masked(ring: np.ndarray, state: ConfigRecord, server_round: int, me: int, *, survivors: set[int],
            bits: int) -> np.ndarray:
    """``ring`` plus this site's self mask and one pairwise mask per surviving neighbour."""
    self_label, pair_label = labels(server_round)
    masked = ring_add(ring, expand_mask(as_bytes(state["self-seed"]), len(ring), bits, self_label))
    mask_sk = as_bytes(state["mask-sk"])
    for j, mask_pk in zip(as_list(state[wire.SA_NEIGHBOURS]), as_list(state[wire.SA_NEIGHBOUR_MASK_PKS]),
                          strict=True):
        if int(j) in survivors:
            seed = agree(mask_sk, bytes(mask_pk), MASK_INFO)
            masked = ring_add(masked, pairwise_mask(seed, me, int(j), len(ring), bits=bits, label=pair_label))
    return masked


def handle_unmask(msg: Message, context: Context) -> Message:
    config, state = config_record(msg.content), _state(context)
    server_round, me = _check_round(state, config), as_int(state[wire.SA_INDEX])
    survivors = {int(j) for j in as_list(config[wire.SA_SURVIVORS])}
    dropped = {int(j) for j in as_list(config[wire.SA_DROPPED])}
    if survivors & dropped:
        raise SecAggError("secure aggregation: the server named a site both surviving and dropped; refusing to "
                          "reveal shares (that would expose its update)")
    threshold = as_int(state[wire.SA_THRESHOLD])
    if len(survivors) < threshold:
        raise SecAggError(f"secure aggregation: only {len(survivors)} survivors, below the threshold "
                          f"{threshold}; refusing to unmask")
    cohort = as_int(state.get(SA_MIN_COHORT, 0))
    if len(survivors) < cohort:  # the site's guarantee rests on its own count, not on the server's word
        raise SecAggError(f"secure aggregation: only {len(survivors)} sites in the sum, below this site's cohort "
                          f"{cohort} (its noise share is 1/{cohort} of the noise); refusing to unmask")
    channel_sk = as_bytes(state["channel-sk"])
    channel_pks = dict(zip((int(j) for j in as_list(state[wire.SA_NEIGHBOURS])),
                           as_list(state[wire.SA_NEIGHBOUR_CHANNEL_PKS]), strict=True))
    reveal_self: list[bytes] = []
    reveal_self_from: list[int] = []
    reveal_key: list[bytes] = []
    reveal_key_from: list[int] = []
    for sender_id, sealed in zip(as_list(config[wire.SA_FROM]), as_list(config[wire.SA_CIPHERTEXTS]), strict=True):
        j = int(sender_id)
        if j not in channel_pks:
            raise SecAggError(f"secure aggregation: a share from site {j}, which is not a neighbour")
        key = agree(channel_sk, bytes(channel_pks[j]), CHANNEL_INFO + struct.pack(">I", server_round))
        plaintext = open_sealed(key, bytes(sealed), aad(server_round, j, me))
        sender, receiver = struct.unpack(">II", plaintext[:8])
        if (sender, receiver) != (j, me):
            raise SecAggError(f"secure aggregation: a share claims to be from {sender} to {receiver}")
        key_share, seed_share = plaintext[8: 8 + SHARE_BYTES], plaintext[8 + SHARE_BYTES:]
        if j in survivors:
            reveal_self.append(seed_share)
            reveal_self_from.append(j)
        elif j in dropped:
            reveal_key.append(key_share)
            reveal_key_from.append(j)
    if me not in survivors:
        raise SecAggError("secure aggregation: the server counts this site as dropped but asks it to unmask")
    reveal_self.append(as_bytes(state["own-seed-share"]))
    reveal_self_from.append(me)
    del context.state[wire.SA_STATE]  # the round's secrets are not kept past unmasking
    reply = ConfigRecord({wire.SA_SELF_MASK_FROM: reveal_self_from, wire.SA_SELF_MASK_SHARES: reveal_self,
                          wire.SA_KEY_FROM: reveal_key_from, wire.SA_KEY_SHARES: reveal_key})
    return Message(RecordDict({wire.CONFIG: reply}), reply_to=msg)

