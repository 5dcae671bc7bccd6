"""X25519 + HKDF agreement and ChaCha20-Poly1305 sealing: symmetric keys, and any tampering is refused."""

from __future__ import annotations

import pytest

from fedpeft.errors import SecAggError
from fedpeft.secagg.keys import KeyPair, agree, generate_keypair, open_sealed, seal

INFO = b"fedpeft/secagg/test"


def test_agreement_is_symmetric_and_separated_by_info() -> None:
    alice, bob, carol = generate_keypair(), generate_keypair(), generate_keypair()
    key = agree(alice.private, bob.public, INFO)
    assert len(key) == 32 and key == agree(bob.private, alice.public, INFO)
    assert key != agree(alice.private, bob.public, b"other purpose")
    assert key != agree(alice.private, carol.public, INFO)


def test_keypair_repr_hides_the_private_key() -> None:
    pair = generate_keypair()
    assert len(pair.private) == len(pair.public) == 32
    assert pair.private.hex() not in repr(pair) and repr(pair.private) not in repr(pair)
    with pytest.raises(SecAggError, match="exactly 32 raw bytes, got 31"):
        KeyPair(private=bytes(31), public=bytes(32))


def test_bad_key_lengths_and_low_order_points_are_refused() -> None:
    pair = generate_keypair()
    with pytest.raises(SecAggError, match="private key must be exactly 32 raw bytes, got 16"):
        agree(bytes(16), pair.public, INFO)
    with pytest.raises(SecAggError, match="peer public key must be exactly 32 raw bytes, got 33"):
        agree(pair.private, pair.public + b"\x00", INFO)
    with pytest.raises(SecAggError, match="low-order point"):
        agree(pair.private, bytes(32), INFO)


def test_seal_round_trip_uses_a_fresh_nonce() -> None:
    key = agree(generate_keypair().private, generate_keypair().public, INFO)
    message = b"share of client 7 for client 9" * 3
    sealed = seal(key, message, b"7->9")
    assert open_sealed(key, sealed, b"7->9") == message
    assert seal(key, message, b"7->9") != sealed
    assert open_sealed(key, seal(key, b"", b""), b"") == b""


def test_any_flipped_byte_wrong_aad_or_wrong_key_fails_authentication() -> None:
    key, wrong_key = bytes(range(32)), bytes(range(1, 33))
    sealed = seal(key, b"0123456789" * 5, b"aad")
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(SecAggError, match="failed authentication"):
            open_sealed(key, bytes(tampered), b"aad")
    with pytest.raises(SecAggError, match="failed authentication"):
        open_sealed(key, sealed, b"aae")
    with pytest.raises(SecAggError, match="failed authentication"):
        open_sealed(wrong_key, sealed, b"aad")
    with pytest.raises(SecAggError, match="truncated"):
        open_sealed(key, sealed[:27], b"aad")
    with pytest.raises(SecAggError, match="seal: key must be exactly 32 raw bytes"):
        seal(bytes(16), b"x", b"")
