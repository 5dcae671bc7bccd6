"""Site keys born at the site: reading the public keys a site sends, and the coordinator's refusal to hold its private
keys.

A site makes its own node key pair (Flower node authentication) and audit key pair (it signs the site's own audit
log) with `fedpeft client keygen`, and sends only ``node.pub`` and ``audit.pub`` to the coordinator's operators. A
coordinator that held a site's ``audit.key`` could forge that site's side of the audit cross-check, and one that held
its ``node.key`` could act as the site; so `fedpeft server` refuses to start while its PKI folder holds any site
private key (``find_site_private_keys``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.errors import DeployError, PkiError

NODE_KEY, NODE_PUB, AUDIT_KEY, AUDIT_PUB = "node.key", "node.pub", "audit.key", "audit.pub"
KEYGEN_FIX = "the site makes its own keys with `fedpeft client keygen --out DIR` and sends only node.pub and audit.pub"
# Any PEM or OpenSSH private key: "PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY"...
_PRIVATE_PEM = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
# Names fedpeft gives site private keys, retired ones included (rotate-site kept node.key.retired-<time>).
_PRIVATE_NAMES = re.compile(r"^(node|audit)\.key(\.retired-.*)?$")
_SCAN_BYTES = 1 << 20  # a key file is a few hundred bytes; logs and data past the first MiB are not read
SCANNED = ("sites", "removed")  # site bundles, and those of removed sites (their audit keys signed past logs)


@dataclass(frozen=True)
class SitePublicKeys:
    """The two public key files a site sends to the coordinator's operators."""

    node: Path  # node.pub: OpenSSH, an EC key (Flower's node authentication)
    audit: Path  # audit.pub: base64 raw Ed25519 key (the site's audit log)


def _read_public_file(path: Path, option: str, expected: str) -> bytes:
    """The bytes of a public key file; PkiError naming it when it is missing, unreadable or a private key."""
    fix = f"pass the {expected} the site sent ({KEYGEN_FIX})"
    if not path.is_file():
        raise PkiError(f"{option} '{path}' {'is not a file' if path.exists() else 'does not exist'}; {fix}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"{option} '{path}' cannot be read ({err.strerror or err}); {fix}") from None
    if _PRIVATE_PEM.search(data) or b"PRIVATE KEY" in data:
        raise PkiError(f"{option} '{path}' is a PRIVATE key: it must never leave the site. Delete this copy, ask "
                       f"the site to make new keys (`fedpeft client keygen --out DIR --force`) and to send only "
                       f"the {expected}")
    return data


def read_node_public_key(path: str | Path, option: str = "--public-key") -> str:
    """The site's node public key as one OpenSSH line (``ecdsa-sha2-nistp384 AAAA...``), checked to be an EC key
    that Flower's node authentication (``flwr supernode register``) accepts."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path).expanduser()
    data = _read_public_file(path, option, "node.pub")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{option} '{path}' is not an OpenSSH public key (it should be one line starting "
                       f"'ecdsa-sha2-nistp384 '); pass the site's node.pub ({KEYGEN_FIX})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.lstrip("_").removesuffix("PublicKey")
        raise PkiError(f"{option} '{path}' is a {kind} key, but Flower's node authentication needs an EC key; "
                       f"{KEYGEN_FIX}")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def read_audit_public_key(path: str | Path, option: str = "--audit-public-key") -> str:
    """The site's audit public key: base64 of the raw 32-byte Ed25519 key, as `fedpeft client keygen` writes it."""
    from fedpeft.audit.keys import load_public_key
    from fedpeft.errors import AuditError

    path = Path(path).expanduser()
    data = _read_public_file(path, option, "audit.pub")
    try:
        return load_public_key(data.decode("ascii").strip())
    except (AuditError, UnicodeDecodeError):
        raise PkiError(f"{option} '{path}' does not hold a base64 Ed25519 public key (32 bytes); pass the site's "
                       f"audit.pub ({KEYGEN_FIX})") from None


def node_fingerprint(openssh_line: str) -> str:
    """``SHA256:...`` as `ssh-keygen -l` prints it: both sides compare it over the phone before the key is trusted."""
    blob = base64.b64decode(openssh_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def check_keys_unused(pki_dir: Path, node_line: str, audit_b64: str | None, name: str) -> None:
    """No other site (nor this one before a rotation) holds the same key: two sites on one node key would be one
    node to Flower, and the coordinator would file one site's replies under the other."""
    for other in sorted((pki_dir / "sites").glob("*")):
        for file, value in ((NODE_PUB, node_line), (AUDIT_PUB, audit_b64)):
            held = other / file
            if value is None or not held.is_file():
                continue
            if held.read_text(encoding="ascii", errors="replace").strip() != value.strip():
                continue
            if other.name == name:
                raise PkiError(f"'{held}' already holds this public key (this site's current key); a rotation needs "
                               "a new key: the site makes it with `fedpeft client keygen --out DIR --force` (add "
                               "--node-key-only to keep its audit key, and then leave out --audit-public-key)")
            raise PkiError(f"'{held}' already holds this public key (the key of site '{other.name}'); each site "
                           f"needs keys of its own: {KEYGEN_FIX}")


def find_site_private_keys(pki_dir: str | Path) -> list[Path]:
    """Every file under ``<pki>/sites`` and ``<pki>/removed`` that is a site private key: named like one
    (node.key, audit.key, their retired copies) or holding a PEM/OpenSSH private key. Symbolic links are not
    followed into other directories; a file that vanishes or cannot be read while a site writes beside it is
    skipped (it holds no key we could see)."""
    found: list[Path] = []
    for top in SCANNED:
        root = Path(pki_dir) / top
        for directory, _, files in os.walk(root, followlinks=False):
            for file_name in sorted(files):
                path = Path(directory) / file_name
                if _PRIVATE_NAMES.match(file_name) or _holds_private_key(path):
                    found.append(path)
    return sorted(found)


def _holds_private_key(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return bool(_PRIVATE_PEM.search(handle.read(_SCAN_BYTES)))
    except OSError:
        return False


def check_no_site_private_keys(pki_dir: str | Path) -> None:
    """DeployError naming each site private key found in the coordinator's PKI folder, and the fix."""
    found = find_site_private_keys(pki_dir)
    if not found:
        return
    listed = "\n".join(f"  {path}" for path in found[:20]) + (f"\n  ... {len(found) - 20} more" if len(found) > 20
                                                                else "")
    raise DeployError(
        f"the PKI folder '{pki_dir}' holds {len(found)} site private key file(s):\n{listed}\n"
        "A coordinator that holds a site's private keys can act as that site and forge its side of the audit "
        "cross-check, so `fedpeft server` will not start. Fix: these keys belong to the sites. Have each site make "
        "its own (`fedpeft client keygen --out DIR --force`), register the public keys it sends (`fedpeft pki "
        "rotate-site NAME --dir PKI --public-key node.pub --audit-public-key audit.pub`), then delete the files "
        "listed here (docs/deployment.md, section 5)")
