"""Ed25519 audit keys: the coordinator's and each site's, as PEM files (private 0600) and raw public keys."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from fedpeft.errors import AuditError
from fedpeft.io.atomic import write_bytes_atomic


def generate_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def public_key_b64(private_or_public: Any) -> str:
    """The raw 32-byte public key, base64: how logs and reports name a writer's key."""
    from cryptography.hazmat.primitives import serialization

    public = private_or_public.public_key() if hasattr(private_or_public, "public_key") else private_or_public
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def key_id(public_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()[:16]


def save_private_key(key: Any, path: Path) -> None:
    """Write the PEM private key with mode 0600 from the first byte, and its public key beside it (.pub)."""
    from cryptography.hazmat.primitives import serialization

    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600, overwrite=False)  # fsync'd; never over an existing key
    write_bytes_atomic(path.with_suffix(".pub"), (public_key_b64(key) + "\n").encode("ascii"), mode=0o644)


def load_private_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise AuditError(f"audit key '{path}' cannot be loaded ({err}); use the audit.key made by `fedpeft pki`") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"audit key '{path}' is not an Ed25519 key; use the audit.key made by `fedpeft pki`")
    return key


def load_or_create_key(path: Path) -> Any:
    """The writer's key at ``path``; a simulation's first run creates it (the run keeps it for resumes)."""
    return load_private_key(path) if path.exists() else _created(path)


def _created(path: Path) -> Any:
    key = generate_key()
    save_private_key(key, path)
    return key


def load_public_key(text_or_path: str | Path) -> str:
    """A public key given as base64 text or as a file holding it (a .pub written here); returns the base64."""
    candidate = Path(str(text_or_path))
    text = candidate.read_text(encoding="ascii").strip() if candidate.is_file() else str(text_or_path).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise AuditError(f"public key {str(text_or_path)!r} is not a base64 Ed25519 key (32 bytes) nor a file "
                         "holding one; pass the writer's audit .pub file")
    return text
