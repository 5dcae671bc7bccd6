"""One key epoch's per-round secrets: HKDF-SHA256 over (purpose, epoch, round) from a site's epoch masters.

A key epoch is set up once (two exchanges) and serves the rounds ``first..last``. For each of those rounds a site
derives, from two 32-byte masters that never leave it, an independent X25519 masking key ``s_r`` and an independent
self-mask seed ``b_r``; it Shamir-shares each round's ``s_r`` and ``b_r`` at set-up. The server reconstructs one
round's ``b_r`` (the site survived) or ``s_r`` (it dropped), which says nothing about any other round's secrets: the
rounds of an epoch are as independent as separately keyed rounds.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.errors import SecAggError
from fedpeft.secagg.keys import agree

SEED_BYTES = 32  # self-mask seeds, masking keys and masters
PK_BYTES = 32  # an X25519 public key
EPOCH_ID_BYTES = 16
SHARE_BYTES = 66  # a Shamir share (fedpeft.secagg.shamir)
MAX_EPOCH_ROUNDS = 512  # the most rounds one set-up serves (bounds the shares a site sends and the server holds)
MASK_KEY = b"mask-key"  # purpose: a round's X25519 masking private key s_r
SELF_SEED = b"self-seed"  # purpose: a round's self-mask seed b_r
CHANNEL_INFO = b"fedpeft-secagg-channel"
MASK_INFO = b"fedpeft-secagg-pairwise"


def check_epoch_id(epoch: bytes) -> bytes:
    if not isinstance(epoch, bytes) or len(epoch) != EPOCH_ID_BYTES:
        raise SecAggError(f"secure aggregation: an epoch id is {EPOCH_ID_BYTES} bytes, got {epoch!r:.40}")
    return epoch


def _context(purpose: bytes, epoch: bytes, server_round: int) -> bytes:
    return struct.pack(">H", len(purpose)) + purpose + check_epoch_id(epoch) + struct.pack(">Q", server_round)


def round_secret(master: bytes, purpose: bytes, epoch: bytes, server_round: int) -> bytes:
    """HKDF-SHA256(master; info = purpose, epoch, round): a new, independent 32-byte secret per round."""
    if len(master) != SEED_BYTES:
        raise SecAggError(f"secure aggregation: an epoch master is {SEED_BYTES} bytes, got {len(master)}")
    info = b"fedpeft-secagg-round|" + _context(purpose, epoch, server_round)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(master)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of 32 raw private bytes (any 32 bytes are a valid X25519 private key)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def round_public_keys(mask_master: bytes, epoch: bytes, first: int, last: int) -> bytes:
    """The public masking keys of rounds ``first..last``, concatenated (``PK_BYTES`` each)."""
    return b"".join(public_key(round_secret(mask_master, MASK_KEY, epoch, r)) for r in range(first, last + 1))


def key_of_round(keys: bytes, first: int, server_round: int) -> bytes:
    """One round's public key out of :func:`round_public_keys`."""
    offset = (server_round - first) * PK_BYTES
    if server_round < first or offset + PK_BYTES > len(keys):
        raise SecAggError(f"secure aggregation: no public masking key for round {server_round} in this epoch")
    return keys[offset: offset + PK_BYTES]


def pairwise_seed(private: bytes, peer_public: bytes, epoch: bytes, server_round: int) -> bytes:
    """The seed of one pair's round mask: X25519 of the two round keys, HKDF with the epoch and round as info."""
    return agree(private, peer_public, MASK_INFO + _context(b"pair", epoch, server_round))


def channel_key(private: bytes, peer_public: bytes, epoch: bytes) -> bytes:
    """The AEAD key two sites seal their shares with for one epoch."""
    return agree(private, peer_public, CHANNEL_INFO + check_epoch_id(epoch))


def share_aad(epoch: bytes, server_round: int, sender: int, receiver: int) -> bytes:
    """Associated data of one sealed pair of shares: the server cannot replay it for another epoch, round or pair."""
    return f"fedpeft-secagg|{epoch.hex()}|{server_round}|{sender}|{receiver}".encode()


def labels(server_round: int) -> tuple[bytes, bytes]:
    """Mask-expansion labels (self, pairwise) for ``expand_mask``; the seeds themselves are already per round."""
    return f"self|{server_round}".encode(), f"pair|{server_round}".encode()
