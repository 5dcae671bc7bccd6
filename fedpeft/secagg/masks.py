"""Masks for secure aggregation: uniform ring vectors expanded from a 32-byte seed by the ChaCha20 keystream.

Anyone holding the seed (the client, or the server after reconstructing it from Shamir shares) derives the same mask
on any platform; without the seed the mask is indistinguishable from uniform, so ``encoding + mask`` hides the update.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpeft.errors import SecAggError
from fedpeft.secagg.encoding import ring_dtype, ring_neg

SEED_BYTES = 32
_DOMAIN = b"fedpeft/secagg/mask/v1:"
# ChaCha20 here has a 32-bit block counter of 64-byte blocks; a longer stream would wrap the counter.
_MAX_STREAM_BYTES = 64 << 32


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _nonce(label: bytes) -> bytes:
    # cryptography's 16-byte ChaCha20 nonce is a 4-byte little-endian block counter then a 12-byte nonce: the counter
    # starts at 0 so it can never run into the label-derived part.
    return bytes(4) + hashlib.sha256(_DOMAIN + label).digest()[:12]


def _check_seed(seed: Any, name: str) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
        raise SecAggError(
            f"{name} must be exactly {SEED_BYTES} bytes, got {got}; pass a seed from agree() or os.urandom(32)"
        )
    return bytes(seed)


def expand_mask(seed: bytes, length: int, bits: int = 32, label: bytes = b"") -> np.ndarray:
    """``length`` uniform ring elements (``uint32``/``uint64``) from the ChaCha20 keystream of ``seed``.

    ``label`` selects an independent stream for the same seed (e.g. one per round or purpose).
    """
    key = _check_seed(seed, "expand_mask: seed")
    if not isinstance(label, (bytes, bytearray)):
        raise SecAggError(f"expand_mask: label must be bytes, got {type(label).__name__}; encode it, e.g. b'round-3'")
    dtype = ring_dtype(bits)
    if not _is_int(length) or length < 0:
        raise SecAggError(f"expand_mask: length={length!r} is invalid; it must be an integer >= 0 (the vector length)")
    nbytes = int(length) * dtype.itemsize
    if nbytes > _MAX_STREAM_BYTES:
        raise SecAggError(
            f"expand_mask: length={length} needs {nbytes} keystream bytes, above the {_MAX_STREAM_BYTES} one ChaCha20 "
            "stream gives; split the vector and use one label per chunk"
        )
    encryptor = Cipher(algorithms.ChaCha20(key, _nonce(bytes(label))), mode=None).encryptor()
    stream = encryptor.update(bytes(nbytes))
    # Explicit little-endian so every platform derives the same mask from the same seed.
    return np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype)


def pairwise_mask(
    shared_seed: bytes, self_id: int, peer_id: int, length: int, *, bits: int = 32, label: bytes = b""
) -> np.ndarray:
    """The mask ``self_id`` adds for its pair with ``peer_id``: ``+m`` if ``self_id < peer_id`` else ``-m``.

    Both peers derive the same ``m`` from their shared seed, so their two masks cancel in the ring sum.
    """
    for name, value in (("self_id", self_id), ("peer_id", peer_id)):
        if not _is_int(value):
            raise SecAggError(f"pairwise_mask: {name}={value!r} is not an integer; pass the node id")
    if self_id == peer_id:
        raise SecAggError(f"pairwise_mask: self_id == peer_id == {self_id}; a node has no pairwise mask with itself")
    mask = expand_mask(_check_seed(shared_seed, "pairwise_mask: shared_seed"), length, bits, label)
    return mask if self_id < peer_id else ring_neg(mask)
