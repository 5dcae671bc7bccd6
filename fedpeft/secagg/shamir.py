"""t-of-n Shamir secret sharing of short byte strings over the prime field GF(2**521 - 1).

Any ``threshold`` shares determine the secret; fewer reveal nothing about it (every secret is equally consistent with
them). Shares carry no integrity: a forged share silently changes the reconstruction, so they must travel sealed
(:func:`fedpeft.secagg.keys.seal`).
"""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.errors import SecAggAbort, SecAggError

PRIME = 2**521 - 1  # Mersenne prime; larger than any 64-byte (512-bit) secret
SHARE_BYTES = 66  # big-endian field element: ceil(521 / 8)
MAX_SECRET_BYTES = 64


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_ids(share_ids: Sequence[int]) -> list[int]:
    ids = list(share_ids)
    for i in ids:
        if not _is_int(i) or not 1 <= i < PRIME:
            raise SecAggError(f"share id {i!r} is invalid; ids must be integers >= 1 (0 would reveal the secret)")
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise SecAggError(f"share ids {dupes} are repeated; give every share holder a distinct id")
    return [int(i) for i in ids]


def _check_threshold(threshold: Any, num_ids: int | None) -> int:
    if not _is_int(threshold) or threshold < 1 or (num_ids is not None and threshold > num_ids):
        upper = "" if num_ids is None else f" and <= the {num_ids} share ids"
        raise SecAggError(f"threshold={threshold!r} is invalid; it must be an integer >= 1{upper}")
    return int(threshold)


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, threshold: int, share_ids: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` (<= 64 bytes), one per id, each a 66-byte field element; ``threshold`` recover it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) > MAX_SECRET_BYTES:
        got = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise SecAggError(f"secret must be bytes of length <= {MAX_SECRET_BYTES}, got {got}; share a seed or key")
    ids = _check_ids(share_ids)
    t = _check_threshold(threshold, len(ids))
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return {i: _evaluate(coefficients, i).to_bytes(SHARE_BYTES, "big") for i in ids}


def _decode_share(share: Any, share_id: int) -> int:
    if not isinstance(share, (bytes, bytearray)) or len(share) != SHARE_BYTES:
        got = f"{len(share)} bytes" if isinstance(share, (bytes, bytearray)) else type(share).__name__
        raise SecAggError(f"share {share_id} must be {SHARE_BYTES} bytes, got {got}; it is corrupted, drop it")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise SecAggError(f"share {share_id} is not a field element (>= 2**521 - 1); it is corrupted, drop it")
    return value


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, bytes], threshold: int, secret_length: int) -> bytes:
    """The ``secret_length``-byte secret from the ``threshold`` shares with the smallest ids.

    :class:`SecAggAbort` if fewer than ``threshold`` shares are given. :class:`SecAggError` if the result does not fit
    in ``secret_length`` bytes, which exposes a forged or corrupted share with overwhelming probability (not always:
    authenticity comes from the sealed channel, not from this check).
    """
    if not isinstance(shares, Mapping):
        raise SecAggError(f"shares must be a mapping share id -> bytes, got {type(shares).__name__}")
    t = _check_threshold(threshold, None)
    if not _is_int(secret_length) or not 0 <= secret_length <= MAX_SECRET_BYTES:
        raise SecAggError(
            f"secret_length={secret_length!r} is invalid; it must be an integer in [0, {MAX_SECRET_BYTES}]"
        )
    if len(shares) < t:
        raise SecAggAbort(
            f"only {len(shares)} shares are available but threshold={t} are needed to reconstruct the secret; "
            "too many holders dropped out, so this round cannot be decoded"
        )
    ids = sorted(_check_ids(list(shares)))[:t]
    value = _interpolate_at_zero([(i, _decode_share(shares[i], i)) for i in ids])
    if value >> (8 * secret_length):
        raise SecAggError(
            f"the shares {ids} reconstruct a value that does not fit in secret_length={secret_length} bytes: a share "
            "is forged or corrupted, or threshold/secret_length differ from the split; drop the round"
        )
    return value.to_bytes(secret_length, "big")
