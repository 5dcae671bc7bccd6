"""The site's side of SecAgg+ (Bell et al., CCS 2020) on Flower's Message API, with keys set up once per key epoch.

Set-up (``site_keys``, once per epoch): keys, then the sealed Shamir shares of every epoch round's secrets.
A round is two exchanges:
Masked input (the TRAIN message): encode w*x and w in the ring, add the round's self mask and one pairwise mask per
    surviving neighbour, all expanded from that round's own secrets; only this leaves the site. A round's masks are
    used for one input: a second request for the same round is refused.
Unmask: for each neighbour, reveal either its round self-mask share (it survived) or its round masking-key share
    (it dropped) -- never both, and one answer per round.
"""

from __future__ import annotations

import struct

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedpeft import wire
from fedpeft.errors import SecAggError, SecAggRefused
from fedpeft.messaging import Refusal, as_bytes, as_int, as_list, config_record
from fedpeft.secagg.derive import (
    MASK_KEY,
    SELF_SEED,
    SHARE_BYTES,
    channel_key,
    key_of_round,
    labels,
    pairwise_seed,
    round_secret,
    share_aad,
)
from fedpeft.secagg.encoding import encode, low_bits, pack_bits, ring_add, ring_encoding
from fedpeft.secagg.keys import open_sealed
from fedpeft.secagg.masks import expand_mask, pairwise_mask
from fedpeft.secagg.site_keys import (
    CHANNEL_SK,
    MASK_MASTER,
    MASKED_ROUND,
    OWN_SEED_SHARES,
    SELF_MASTER,
    UNMASKED_ROUND,
    epoch_rounds,
    epoch_state,
    handle_keys,
    handle_shares,
)

__all__ = ["handle_keys", "handle_shares", "handle_unmask", "masked_integers", "masked_upload", "ready"]
SA_MIN_COHORT = "min-cohort"  # node state: the fewest sites this site's noise share was calibrated to


def ready(config: ConfigRecord, context: Context) -> None:
    """Before training: this site can mask an input for the message's round (it holds the epoch's keys for that
    round and has not masked one for it yet), else a refusal -- so no round is trained, and spent, for nothing."""
    state = epoch_state(context, config)
    server_round, (first, last) = as_int(config[wire.SERVER_ROUND]), epoch_rounds(state)
    if not first <= server_round <= last:
        raise SecAggRefused(f"secure aggregation: round {server_round} is outside this site's key epoch "
                            f"({first}..{last}); the server re-keys")
    if server_round <= as_int(state[MASKED_ROUND]):
        raise SecAggRefused(f"secure aggregation: this site already masked an input for round "
                            f"{as_int(state[MASKED_ROUND])}; a round's masks hide one input only")


def _begin(config: ConfigRecord, context: Context) -> tuple[ConfigRecord, int, set[int]]:
    ready(config, context)
    state = epoch_state(context, config)
    server_round = as_int(config[wire.SERVER_ROUND])
    survivors = {int(j) for j in as_list(config[wire.SA_SURVIVORS])}
    if as_int(state[wire.SA_INDEX]) not in survivors:
        raise SecAggRefused("secure aggregation: the round's site list does not name this site")
    state[MASKED_ROUND] = server_round  # before any mask is computed: this round's masks are never used again
    state[wire.SA_SURVIVORS] = sorted(survivors)
    return state, server_round, survivors


def masked_upload(config: ConfigRecord, context: Context, values: np.ndarray, weight: float, *, clip_range: float,
                  bits: int) -> ArrayRecord:
    """The masked input: the ring-encoded, masked (weight * clip(values), weight); ``weight`` is already in [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise SecAggError(f"secure aggregation: normalised weight {weight} is outside [0, 1]; raise "
                          "secagg.max_weight above the largest site weight")
    state, server_round, survivors = _begin(config, context)
    clipped = np.clip(np.asarray(values, dtype=np.float64), -clip_range, clip_range)
    vector = np.concatenate([weight * clipped, [weight]])
    encoding = ring_encoding(clip_range, as_int(state[wire.SA_NUM]), bits)
    masked = _masked(encode(vector, encoding), state, server_round, survivors=survivors, bits=bits)
    return ArrayRecord({wire.SA_MASKED: Array(masked)})


def masked_integers(config: ConfigRecord, context: Context, values: np.ndarray, *, bits: int,
                    min_cohort: int = 0) -> ArrayRecord:
    """The masked input for integer values (distributed DP): ``values`` (int64, already the site's noisy integer
    sum) in the sub-ring Z_2^bits of Z_2^32, masked, and packed at ``bits`` bits a value.

    The masks are the float path's (uniform over Z_2^32, so uniform over Z_2^bits once reduced) and cancel in the
    sum modulo 2^32, hence modulo 2^bits. ``min_cohort``: this site reveals its unmasking shares only when at least
    that many sites are in the sum (its noise share is calibrated to that many shares).
    """
    state, server_round, survivors = _begin(config, context)
    masked = _masked(np.asarray(values, dtype=np.int64).astype(np.uint32), state, server_round,
                     survivors=survivors, bits=32)
    state[SA_MIN_COHORT] = int(min_cohort)
    return ArrayRecord({wire.SA_MASKED: Array(pack_bits(low_bits(masked, bits), bits))})


def _masked(ring: np.ndarray, state: ConfigRecord, server_round: int, *, survivors: set[int],
            bits: int) -> np.ndarray:
    """``ring`` plus this site's round self mask and one round pairwise mask per surviving neighbour."""
    epoch, me = as_bytes(state[wire.SA_EPOCH]), as_int(state[wire.SA_INDEX])
    first, _ = epoch_rounds(state)
    self_label, pair_label = labels(server_round)
    self_seed = round_secret(as_bytes(state[SELF_MASTER]), SELF_SEED, epoch, server_round)
    masked = ring_add(ring, expand_mask(self_seed, len(ring), bits, self_label))
    mask_sk = round_secret(as_bytes(state[MASK_MASTER]), MASK_KEY, epoch, server_round)
    for j, mask_pks in zip(as_list(state[wire.SA_NEIGHBOURS]), as_list(state[wire.SA_NEIGHBOUR_MASK_PKS]),
                           strict=True):
        if int(j) in survivors:
            seed = pairwise_seed(mask_sk, key_of_round(bytes(mask_pks), first, server_round), epoch, server_round)
            masked = ring_add(masked, pairwise_mask(seed, me, int(j), len(ring), bits=bits, label=pair_label))
    return masked


def handle_unmask(msg: Message, context: Context) -> Message:
    """Unmask: the shares this site may reveal for the round, or a typed refusal (nothing revealed)."""
    try:
        reply = _unmask(config_record(msg.content), context)
    except SecAggError as err:
        refusal = Refusal.of(err if isinstance(err, SecAggRefused) else SecAggRefused(str(err)))
        return Message(refusal.content(int(context.node_config.get(wire.NODE_PARTITION_ID, -1))), reply_to=msg)
    return Message(RecordDict({wire.CONFIG: reply}), reply_to=msg)


def _check_unmask(state: ConfigRecord, config: ConfigRecord, server_round: int) -> tuple[set[int], set[int]]:
    """The request's (survivors, dropped), if this site may answer it at all."""
    me = as_int(state[wire.SA_INDEX])
    if server_round != as_int(state[MASKED_ROUND]) or server_round <= as_int(state[UNMASKED_ROUND]):
        raise SecAggRefused(f"secure aggregation: an unmasking request for round {server_round}, but this site "
                            f"masked round {as_int(state[MASKED_ROUND])} last and answers each round once")
    survivors = {int(j) for j in as_list(config[wire.SA_SURVIVORS])}
    dropped = {int(j) for j in as_list(config[wire.SA_DROPPED])}
    if survivors & dropped:
        raise SecAggRefused("secure aggregation: the server named a site both surviving and dropped; refusing to "
                            "reveal shares (that would expose its update)")
    if me not in survivors:
        raise SecAggRefused("secure aggregation: the server counts this site as dropped but asks it to unmask")
    if not (survivors | dropped) <= set(as_list(state[wire.SA_SURVIVORS])):
        raise SecAggRefused("secure aggregation: the unmasking request names sites this round's masks did not")
    threshold = as_int(state[wire.SA_THRESHOLD])
    if len(survivors) < threshold:
        raise SecAggRefused(f"secure aggregation: only {len(survivors)} survivors, below the threshold "
                            f"{threshold}; refusing to unmask")
    cohort = as_int(state.get(SA_MIN_COHORT, 0))
    if len(survivors) < cohort:  # the site's guarantee rests on its own count, not on the server's word
        raise SecAggRefused(f"secure aggregation: only {len(survivors)} sites in the sum, below this site's cohort "
                            f"{cohort} (its noise share is 1/{cohort} of the noise); refusing to unmask")
    return survivors, dropped


def _unmask(config: ConfigRecord, context: Context) -> ConfigRecord:
    state = epoch_state(context, config)
    server_round, me = as_int(config[wire.SERVER_ROUND]), as_int(state[wire.SA_INDEX])
    survivors, dropped = _check_unmask(state, config, server_round)
    state[UNMASKED_ROUND] = server_round  # from here on, no second answer for this round, whatever happens
    epoch, (first, last) = as_bytes(state[wire.SA_EPOCH]), epoch_rounds(state)
    channel_pks = dict(zip((int(j) for j in as_list(state[wire.SA_NEIGHBOURS])),
                           as_list(state[wire.SA_NEIGHBOUR_CHANNEL_PKS]), strict=True))
    reveal: dict[str, list] = {"self": [], "self_from": [], "key": [], "key_from": []}
    for sender_id, sealed in zip(as_list(config[wire.SA_FROM]), as_list(config[wire.SA_CIPHERTEXTS]), strict=True):
        j = int(sender_id)
        if j not in channel_pks:
            raise SecAggRefused(f"secure aggregation: a share from site {j}, which is not a neighbour")
        key = channel_key(as_bytes(state[CHANNEL_SK]), bytes(channel_pks[j]), epoch)
        plaintext = open_sealed(key, bytes(sealed), share_aad(epoch, server_round, j, me))
        if struct.unpack(">III", plaintext[:12]) != (j, me, server_round):
            raise SecAggRefused(f"secure aggregation: a share claims another sender, receiver or round than {j}")
        kind = "self" if j in survivors else "key" if j in dropped else None
        if kind is not None:
            reveal[kind].append(plaintext[12: 12 + SHARE_BYTES] if kind == "key" else plaintext[12 + SHARE_BYTES:])
            reveal[kind + "_from"].append(j)
    own = as_bytes(state[OWN_SEED_SHARES])
    reveal["self"].append(own[(server_round - first) * SHARE_BYTES: (server_round - first + 1) * SHARE_BYTES])
    reveal["self_from"].append(me)
    if server_round == last:
        del context.state[wire.SA_STATE]  # the epoch is over: its secrets are not kept
    return ConfigRecord({wire.SA_SELF_MASK_FROM: reveal["self_from"], wire.SA_SELF_MASK_SHARES: reveal["self"],
                         wire.SA_KEY_FROM: reveal["key_from"], wire.SA_KEY_SHARES: reveal["key"]})
