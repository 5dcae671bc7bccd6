"""X25519 key agreement, HKDF-SHA256 key derivation and ChaCha20-Poly1305 sealing of messages between clients."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def _check_bytes(value: Any, name: str, length: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise SecAggError(f"{name} must be bytes, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise SecAggError(f"{name} must be exactly {length} raw bytes, got {len(value)}; pass a raw X25519/AEAD key")
    return bytes(value)


@dataclass(frozen=True)
class KeyPair:
    """A raw X25519 key pair."""

    private: bytes = field(repr=False)  # kept out of repr so logging a KeyPair never leaks the secret key
    public: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.private, "KeyPair.private", KEY_BYTES)
        _check_bytes(self.public, "KeyPair.public", KEY_BYTES)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's CSPRNG."""
    key = X25519PrivateKey.generate()
    return KeyPair(private=key.private_bytes_raw(), public=key.public_key().public_bytes_raw())


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """X25519(private, peer_public), then HKDF-SHA256 (no salt, ``info``) to a 32-byte key; symmetric in the pair.

    ``info`` separates the uses of one key pair (e.g. b"secagg/encryption" vs b"secagg/mask").
    """
    sk = X25519PrivateKey.from_private_bytes(_check_bytes(private, "agree: private key", KEY_BYTES))
    pk = X25519PublicKey.from_public_bytes(_check_bytes(peer_public, "agree: peer public key", KEY_BYTES))
    info = _check_bytes(info, "agree: info")
    try:
        shared = sk.exchange(pk)
    except ValueError as exc:
        raise SecAggError(
            "agree: X25519 with this peer public key gives the all-zero secret (a low-order point); "
            "the peer key is malicious or corrupted, drop that peer"
        ) from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(plaintext, aad)`` with a fresh random 12-byte nonce.

    Random nonces are safe for the few messages one pairwise key seals (collisions need ~2**48 messages).
    """
    aead = ChaCha20Poly1305(_check_bytes(key, "seal: key", KEY_BYTES))
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, _check_bytes(plaintext, "seal: plaintext"), _check_bytes(aad, "seal: aad"))


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`; :class:`SecAggError` if the blob, the key or ``aad`` does not match."""
    aead = ChaCha20Poly1305(_check_bytes(key, "open_sealed: key", KEY_BYTES))
    blob = _check_bytes(sealed, "open_sealed: sealed")
    aad = _check_bytes(aad, "open_sealed: aad")
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(
            f"open_sealed: sealed message is {len(blob)} bytes, shorter than nonce + tag "
            f"({NONCE_BYTES + TAG_BYTES}); it is truncated, drop it"
        )
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggError(
            "open_sealed: sealed message failed authentication (tampered, wrong key, or wrong associated data); "
            "drop the message and treat its sender as dropped"
        ) from exc
