"""Shamir sharing over GF(2**521 - 1): any t shares recover, t - 1 reveal nothing, forged shares do not recover."""

from __future__ import annotations

import itertools
import os

import pytest

from fedpeft.errors import SecAggAbort, SecAggError
from fedpeft.secagg.shamir import PRIME, SHARE_BYTES, combine, split


def _field(share: bytes) -> int:
    return int.from_bytes(share, "big")


def _lagrange_at_zero(i: int, ids: list[int]) -> int:
    num, den = 1, 1
    for j in ids:
        if j != i:
            num, den = num * j % PRIME, den * (j - i) % PRIME
    return num * pow(den, -1, PRIME) % PRIME


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 3), (2, 3), (3, 5), (4, 7), (5, 5)])
def test_any_t_of_n_shares_reconstruct(t: int, n: int) -> None:
    secret = os.urandom(32)
    shares = split(secret, t, range(1, n + 1))
    assert len(shares) == n and all(len(s) == SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(sorted(shares), t):
        assert combine({i: shares[i] for i in subset}, t, 32) == secret


def test_extra_shares_are_ignored_and_sparse_ids_work() -> None:
    secret = b"\x00\x00leading zeros survive" + os.urandom(40)
    shares = split(secret, 3, [10**12, 7, 123456789, 2])
    assert combine(shares, 3, len(secret)) == secret
    assert combine(split(b"", 2, [1, 2]), 2, 0) == b""


def test_fewer_than_threshold_shares_abort_with_the_numbers() -> None:
    shares = split(os.urandom(32), 4, range(1, 8))
    with pytest.raises(SecAggAbort, match="only 3 shares are available but threshold=4"):
        combine({i: shares[i] for i in (1, 2, 3)}, 4, 32)


def test_a_single_share_is_consistent_with_every_secret() -> None:
    # t = 2: f(x) = s + a x. For the observed share (x1, y1) and ANY candidate secret s', a' = (y1 - s') / x1 is a
    # valid coefficient producing exactly that share, so one share carries no information about s.
    x1 = 5
    y1 = _field(split(os.urandom(32), 2, [x1, 9])[x1])
    for candidate in (b"\x00" * 32, b"\xff" * 32, b"attack at dawn".ljust(32, b".")):
        s = int.from_bytes(candidate, "big")
        a = (y1 - s) * pow(x1, -1, PRIME) % PRIME
        assert (s + a * x1) % PRIME == y1
        # The second share of that polynomial, with the observed one, reconstructs the candidate.
        other = ((s + a * 9) % PRIME).to_bytes(SHARE_BYTES, "big")
        assert combine({x1: y1.to_bytes(SHARE_BYTES, "big"), 9: other}, 2, 32) == candidate


def test_a_forged_share_does_not_reconstruct_the_secret() -> None:
    secret = b"\x01" + os.urandom(31)  # leading 0x01 so secret + 1 still fits in 32 bytes
    shares = split(secret, 3, range(1, 6))
    used = {i: shares[i] for i in (1, 2, 3)}
    random_element = (int.from_bytes(os.urandom(SHARE_BYTES), "big") % PRIME).to_bytes(SHARE_BYTES, "big")
    forged = {**used, 3: random_element}
    # The result is then a uniform field element: outside 32 bytes but with probability 2**-265, reported as tampering.
    with pytest.raises(SecAggError, match="forged or corrupted"):
        combine(forged, 3, 32)
    # A forger who aims for an in-range value still only gets a different secret: shares need the sealed channel.
    delta = 1
    shift = delta * pow(_lagrange_at_zero(3, [1, 2, 3]), -1, PRIME) % PRIME
    aimed = {**used, 3: ((_field(used[3]) + shift) % PRIME).to_bytes(SHARE_BYTES, "big")}
    result = combine(aimed, 3, 32)
    assert result != secret
    assert int.from_bytes(result, "big") == int.from_bytes(secret, "big") + delta


@pytest.mark.parametrize(
    ("secret", "t", "ids", "message"),
    [
        (b"x" * 65, 2, [1, 2], "length <= 64"),
        ("text", 2, [1, 2], "must be bytes"),
        (b"x", 0, [1, 2], "threshold=0"),
        (b"x", 3, [1, 2], "threshold=3"),
        (b"x", 2, [0, 1], "share id 0"),
        (b"x", 2, [-1, 1], "share id -1"),
        (b"x", 2, [1, 1, 2], r"share ids \[1\] are repeated"),
        (b"x", 2, [1, True], "share id True"),
    ],
)
def test_invalid_split_arguments_are_refused(secret: bytes, t: int, ids: list, message: str) -> None:
    with pytest.raises(SecAggError, match=message):
        split(secret, t, ids)


def test_malformed_shares_are_refused() -> None:
    shares = split(b"k" * 16, 2, [1, 2])
    with pytest.raises(SecAggError, match="must be 66 bytes, got 65"):
        combine({1: shares[1], 2: shares[2][1:]}, 2, 16)
    with pytest.raises(SecAggError, match="not a field element"):
        combine({1: shares[1], 2: b"\xff" * SHARE_BYTES}, 2, 16)
    with pytest.raises(SecAggError, match="secret_length=65"):
        combine(shares, 2, 65)
