"""The site's key set-up for one key epoch (two exchanges, once per epoch) and its epoch state.

Set-up 1 (keys): make a channel key pair and two 32-byte masters (masking keys, self-mask seeds); return the channel
    public key and the public masking key of each of the epoch's rounds (``derive.round_public_keys``).
Set-up 2 (shares): for each round of the epoch, Shamir-share that round's masking key ``s_r`` and self-mask seed
    ``b_r`` among the neighbours and the site itself; each neighbour's pair of shares for a round is sealed on its own
    (ChaCha20-Poly1305, associated data: epoch, round, sender, receiver), so the server can forward one round's
    shares at a time and can replay none of them into another round, epoch or pair.

What a site keeps (``context.state[wire.SA_STATE]``, never sent): the channel private key, the two masters, the
neighbours' public keys, its own self-mask-seed shares, and the last round it masked and unmasked (a round's masks
are used for one input only, and a round's unmasking request is answered once).
"""

from __future__ import annotations

import os
import struct

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft import wire
from fedpeft.errors import SecAggRefused
from fedpeft.messaging import as_bytes, as_int, as_list, config_record
from fedpeft.secagg.derive import (
    MASK_KEY,
    MAX_EPOCH_ROUNDS,
    PK_BYTES,
    SEED_BYTES,
    SELF_SEED,
    channel_key,
    check_epoch_id,
    round_public_keys,
    round_secret,
    share_aad,
)
from fedpeft.secagg.keys import generate_keypair, seal
from fedpeft.secagg.shamir import split

CHANNEL_SK = "channel-sk"
MASK_MASTER = "mask-master"
SELF_MASTER = "self-master"
OWN_SEED_SHARES = "own-seed-shares"  # this site's own share of each round's self-mask seed, concatenated
MASKED_ROUND = "masked-round"  # the last round this site sent a masked input for
UNMASKED_ROUND = "unmasked-round"  # the last round this site answered an unmasking request for


def epoch_state(context: Context, config: ConfigRecord) -> ConfigRecord:
    """The site's state for the epoch the message names; a refusal if it holds none (it missed or lost the set-up)."""
    if wire.SA_STATE not in context.state:
        raise SecAggRefused("secure aggregation: this site holds no keys (it missed the key set-up or restarted); "
                            "the server re-keys at the next round")
    state = config_record(context.state, wire.SA_STATE)
    if as_bytes(state[wire.SA_EPOCH]) != as_bytes(config[wire.SA_EPOCH]):
        raise SecAggRefused("secure aggregation: the message is for a key epoch this site does not hold; the "
                            "server re-keys at the next round")
    return state


def epoch_rounds(state: ConfigRecord) -> tuple[int, int]:
    return as_int(state[wire.SA_FIRST_ROUND]), as_int(state[wire.SA_LAST_ROUND])


def handle_keys(msg: Message, context: Context) -> Message:
    """Set-up 1: a new epoch's keys (any earlier epoch's secrets are dropped)."""
    config = config_record(msg.content)
    epoch = check_epoch_id(as_bytes(config[wire.SA_EPOCH]))
    first, last = as_int(config[wire.SA_FIRST_ROUND]), as_int(config[wire.SA_LAST_ROUND])
    if not 1 <= last - first + 1 <= MAX_EPOCH_ROUNDS:
        raise SecAggRefused(f"secure aggregation: a key epoch of rounds {first}..{last}; it must serve 1 to "
                            f"{MAX_EPOCH_ROUNDS} rounds")
    channel, mask_master, self_master = generate_keypair(), os.urandom(SEED_BYTES), os.urandom(SEED_BYTES)
    context.state[wire.SA_STATE] = ConfigRecord({
        wire.SA_EPOCH: epoch, wire.SA_FIRST_ROUND: first, wire.SA_LAST_ROUND: last,
        wire.SA_INDEX: as_int(config[wire.SA_INDEX]), wire.SA_NUM: as_int(config[wire.SA_NUM]),
        wire.SA_THRESHOLD: as_int(config[wire.SA_THRESHOLD]), CHANNEL_SK: channel.private, MASK_MASTER: mask_master,
        SELF_MASTER: self_master, MASKED_ROUND: first - 1, UNMASKED_ROUND: first - 1})
    reply = ConfigRecord({wire.SA_CHANNEL_PK: channel.public,
                          wire.SA_MASK_PK: round_public_keys(mask_master, epoch, first, last)})
    return Message(RecordDict({wire.CONFIG: reply}), reply_to=msg)


def handle_shares(msg: Message, context: Context) -> Message:
    """Set-up 2: every round's shares for every neighbour, each sealed for its recipient and round."""
    config = config_record(msg.content)
    state = epoch_state(context, config)
    first, last = epoch_rounds(state)
    neighbours = [int(j) for j in as_list(config[wire.SA_NEIGHBOURS])]
    channel_pks = [bytes(pk) for pk in as_list(config[wire.SA_NEIGHBOUR_CHANNEL_PKS])]
    mask_pks = [bytes(pk) for pk in as_list(config[wire.SA_NEIGHBOUR_MASK_PKS])]
    if not len(neighbours) == len(channel_pks) == len(mask_pks) or \
            any(len(pk) != (last - first + 1) * PK_BYTES for pk in mask_pks):
        raise SecAggRefused("secure aggregation: the neighbours' public keys do not match the epoch's rounds")
    state[wire.SA_NEIGHBOURS] = neighbours
    state[wire.SA_NEIGHBOUR_CHANNEL_PKS] = channel_pks
    state[wire.SA_NEIGHBOUR_MASK_PKS] = mask_pks
    sealed, own = _sealed_shares(state, neighbours, channel_pks)
    state[OWN_SEED_SHARES] = own
    reply = ConfigRecord({wire.SA_TO: neighbours, wire.SA_CIPHERTEXTS: sealed})
    return Message(RecordDict({wire.CONFIG: reply}), reply_to=msg)


def _sealed_shares(state: ConfigRecord, neighbours: list[int], channel_pks: list[bytes]) -> tuple[list[bytes], bytes]:
    """(the sealed shares, neighbour-major: each neighbour's rounds first..last in turn; this site's own self-mask
    seed shares, concatenated). The own masking-key share is never revealed (a site asked to unmask is alive)."""
    epoch, me = as_bytes(state[wire.SA_EPOCH]), as_int(state[wire.SA_INDEX])
    threshold = as_int(state[wire.SA_THRESHOLD])
    first, last = epoch_rounds(state)
    mask_master, self_master = as_bytes(state[MASK_MASTER]), as_bytes(state[SELF_MASTER])
    keys = [channel_key(as_bytes(state[CHANNEL_SK]), pk, epoch) for pk in channel_pks]
    holders = [*neighbours, me]  # degree + 1 holders: the neighbours and the site itself
    per_neighbour: list[list[bytes]] = [[] for _ in neighbours]
    own = []
    for server_round in range(first, last + 1):
        key_shares = split(round_secret(mask_master, MASK_KEY, epoch, server_round), threshold, holders)
        seed_shares = split(round_secret(self_master, SELF_SEED, epoch, server_round), threshold, holders)
        own.append(seed_shares[me])
        for out, j, key in zip(per_neighbour, neighbours, keys, strict=True):
            plaintext = struct.pack(">III", me, j, server_round) + key_shares[j] + seed_shares[j]
            out.append(seal(key, plaintext, share_aad(epoch, server_round, me, j)))
    return [blob for out in per_neighbour for blob in out], b"".join(own)
