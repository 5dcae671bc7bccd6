"""Pre-flight checks run before fedpeft starts ``flower-superlink`` (coordinator) or ``flower-supernode`` (site).

Flower reports a missing file, an expired or foreign certificate, a key that does not match, or an unreachable
coordinator poorly (or only once a round fails). Each check here raises :class:`DeployError` naming the file or
address, the value found, and the fix in one sentence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import socket
import ssl
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.errors import CoordinatorUnreachable, DeployError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

PKI_FIX = "re-issue it with `fedpeft pki init`"
BUNDLE_FIX = "ask the coordinator's operators for a new bundle (`fedpeft pki add-site`)"
# The node key is born at the site: a new one is made there and only its public half is registered.
NODE_KEY_FIX = ("ask the coordinator's operators to register a new key: make it here with `fedpeft client keygen "
                "--out DIR --force` and send them node.pub (they run `fedpeft pki add-site` or `rotate-site`)")
ADDRESS_FIX = "write it as host:port, e.g. coordinator.example.org:9092 (IPv6 in brackets: [2001:db8::1]:9092)"
DATA_FIX = "set data_path in site.toml to this site's .csv or .jsonl data file"
_TIME = "%Y-%m-%d %H:%M:%S UTC"
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def check_readable_file(path: str | Path, what: str, fix: str) -> Path:
    """The resolved path of an existing, readable regular file."""
    given = Path(path).expanduser()
    try:
        if not given.exists():
            raise DeployError(f"{what} '{path}' does not exist; {fix}")
        if not given.is_file():
            raise DeployError(f"{what} '{path}' is not a file; {fix}")
        with given.open("rb"):
            pass
    except OSError as err:
        raise DeployError(f"{what} '{path}' cannot be read ({err.strerror or err}); {fix}") from err
    return given.resolve()


def _first_line(data: bytes) -> str:
    line = data.lstrip().split(b"\n", 1)[0][:60].decode("utf-8", "replace").strip()
    return f"its first line is {line!r}" if line else "it is empty"


def load_certificate(path: str | Path, what: str, fix: str = PKI_FIX) -> x509.Certificate:
    """A PEM X.509 certificate read from ``path``."""
    from cryptography import x509

    file = check_readable_file(path, what, fix)
    data = file.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise DeployError(f"{what} '{path}' is not a PEM certificate ({_first_line(data)}); {fix}") from err


def check_validity(cert: x509.Certificate, path: str | Path, what: str, now: dt.datetime | None = None, *,
                   fix: str = PKI_FIX) -> None:
    """Raise unless ``now`` (default: the current time) lies within the certificate's validity period."""
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    period = f"valid from {before:{_TIME}} to {after:{_TIME}}, now is {now.astimezone(dt.UTC):{_TIME}}"
    if now < before:
        raise DeployError(f"{what} '{path}' is not valid yet ({period}); check this machine's clock, or {fix}")
    if now > after:
        raise DeployError(f"{what} '{path}' expired on {after:{_TIME}} ({period}); {fix}")


def _check_issued_by(cert: x509.Certificate, ca: x509.Certificate, cert_path: str | Path,
                     ca_path: str | Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if cert.issuer != ca.subject:
        raise DeployError(f"coordinator certificate '{cert_path}' was issued by '{cert.issuer.rfc4514_string()}', "
                          f"not by the CA '{ca_path}' ('{ca.subject.rfc4514_string()}'); {PKI_FIX}")
    ca_key = ca.public_key()
    try:
        if isinstance(ca_key, ec.EllipticCurvePublicKey):
            ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(_signature_hash(cert)))
        elif isinstance(ca_key, rsa.RSAPublicKey):
            pad = cert.signature_algorithm_parameters
            pad = pad if isinstance(pad, padding.AsymmetricPadding) else padding.PKCS1v15()
            ca_key.verify(cert.signature, cert.tbs_certificate_bytes, pad, _signature_hash(cert))
        else:
            raise DeployError(f"CA certificate '{ca_path}' has a {type(ca_key).__name__} key, which fedpeft cannot "
                              f"check (EC and RSA only); {PKI_FIX}")
    except InvalidSignature as err:
        raise DeployError(f"coordinator certificate '{cert_path}' is not signed by this CA ('{ca_path}'; same name "
                          f"'{ca.subject.rfc4514_string()}' but another key); {PKI_FIX}") from err


def _signature_hash(cert: x509.Certificate) -> hashes.HashAlgorithm:
    """The hash the certificate's signature was made with; none (Ed25519, Ed448): no EC or RSA key signed it."""
    from cryptography.exceptions import InvalidSignature

    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        raise InvalidSignature
    return algorithm


def _fingerprint(public_der: bytes) -> str:
    return "sha256:" + hashlib.sha256(public_der).hexdigest()[:16]


def _check_key_matches(cert: x509.Certificate, cert_path: str | Path, key_path: str | Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    file = check_readable_file(key_path, "coordinator private key", PKI_FIX)
    try:
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    except TypeError as err:
        raise DeployError(f"coordinator private key '{key_path}' is protected by a password, but flower-superlink "
                          f"needs an unencrypted key; {PKI_FIX}") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise DeployError(f"coordinator private key '{key_path}' is not a PEM private key; {PKI_FIX}") from err
    check_private_mode(file, "coordinator private key")
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ours, theirs = key.public_key().public_bytes(der, spki), cert.public_key().public_bytes(der, spki)
    if ours != theirs:
        raise DeployError(f"coordinator private key '{key_path}' (public key {_fingerprint(ours)}) does not belong "
                          f"to certificate '{cert_path}' (public key {_fingerprint(theirs)}); {PKI_FIX}")


def _san_entries(cert: x509.Certificate, cert_path: str | Path) -> list[str]:
    from cryptography import x509

    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise DeployError(f"coordinator certificate '{cert_path}' lists no host names (no subjectAltName), so no "
                          f"site can verify it; {PKI_FIX}") from err
    return [str(name.value) for name in names if isinstance(name, (x509.DNSName, x509.IPAddress))]


def check_server_certificate(cert_path: str | Path, key_path: str | Path, ca_path: str | Path,
                             now: dt.datetime | None = None) -> list[str]:
    """Check the coordinator's TLS certificate, key and CA belong together; return the names it serves (SANs)."""
    cert = load_certificate(cert_path, "coordinator certificate")
    ca = load_certificate(ca_path, "CA certificate")
    check_validity(ca, ca_path, "CA certificate", now)
    check_validity(cert, cert_path, "coordinator certificate", now)
    _check_issued_by(cert, ca, cert_path, ca_path)
    _check_key_matches(cert, cert_path, key_path)
    return _san_entries(cert, cert_path)


def check_node_key(key_path: str | Path) -> str:
    """Check a site's node-authentication key (OpenSSH, EC, mode 0600); return its OpenSSH public key line.

    Flower's ``flower-supernode`` (1.41) accepts only EC keys for ``--auth-supernode-private-key``; it rejects an
    Ed25519 key with "Unable to parse the private key file", so this check rejects it first, with a clearer message.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    file = check_readable_file(key_path, "site node key", NODE_KEY_FIX)
    check_private_mode(file, "site node key")
    data = file.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError as err:
        raise DeployError(f"site node key '{key_path}' is protected by a password, but flower-supernode needs an "
                          f"unencrypted key; {NODE_KEY_FIX}") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise DeployError(f"site node key '{key_path}' is not an OpenSSH private key ({_first_line(data)}); "
                          f"{NODE_KEY_FIX}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.lstrip("_").removesuffix("PrivateKey")
        raise DeployError(f"site node key '{key_path}' is a {kind} key, but Flower's node authentication needs an "
                          f"EC key (fedpeft issues NIST P-384); {NODE_KEY_FIX}")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode("ascii")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``(host, port)`` from "host:port" or "[IPv6]:port"."""

    def bad(problem: str) -> DeployError:
        return DeployError(f"{what} '{text}' {problem}; {ADDRESS_FIX}")

    raw = text.strip()
    if "://" in raw:
        raise bad(f"includes a scheme ('{raw.split('://', 1)[0]}://'), which a host:port address has not")
    if raw.startswith("["):
        host, closed, rest = raw[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise bad("has no ']:port' after the bracketed IPv6 address")
        port = rest[1:]
    else:
        host, colon, port = raw.rpartition(":")
        if not colon:
            raise bad("has no port")
        if ":" in host:
            raise bad("has an IPv6 address without brackets")
    if not host:
        raise bad("has no host")
    problem = host_problem(host)
    if problem is not None:
        raise bad(f"has an invalid host '{host}' (it {problem})")
    if not (port.isascii() and port.isdigit()):
        raise bad(f"has a port '{port}' that is not a whole number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise bad(f"has port {number}, outside 1-65535")
    return host, number


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a DNS host name, or None when it is one."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host.removesuffix(".")
    if not 1 <= len(name) <= 253:
        return "is not 1-253 characters long"
    odd = sorted({ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "-._"))})
    if odd:
        return f"holds {', '.join(map(repr, odd))}; a host name has only letters, digits, '-' and '.'"
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return "is not a valid IP address"
    for label in labels:
        if not _HOST_LABEL.match(label):
            return (f"has the part {label!r}; each dot-separated part is 1-63 letters, digits or '-', and neither "
                    "starts nor ends with '-'")
    return None


def check_host(host: str, what: str, fix: str) -> str:
    """``host`` when it is an IP address or a DNS host name; DeployError naming it otherwise."""
    problem = host_problem(host)
    if problem is not None:
        raise DeployError(f"{what} '{host}' {problem}; {fix}")
    return host


def check_private_mode(path: Path, what: str) -> None:
    """A private key must not be readable or writable by other users of the machine."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DeployError(f"{what} '{path}' has mode {mode:04o}, so other users of this machine can access it; "
                          f"restrict it with `chmod 600 {path}`")


def check_audit_key(path: str | Path, what: str, fix: str) -> str:
    """An Ed25519 audit signing key: present, mode 0600, loadable; returns its public key (base64)."""
    from fedpeft.audit.keys import load_private_key, public_key_b64
    from fedpeft.errors import AuditError

    file = check_readable_file(path, what, fix)
    check_private_mode(file, what)
    try:
        return public_key_b64(load_private_key(file))
    except AuditError:
        raise DeployError(f"{what} '{path}' is not an Ed25519 private key (PEM) ({_first_line(file.read_bytes())}); "
                          f"{fix}") from None


def check_data_rows(path: str | Path, minimum: int = 2) -> int:
    """The number of data rows of the site's data file; DeployError when it cannot be read or has too few."""
    from fedpeft.data.loaders import count_rows
    from fedpeft.errors import DataError

    try:
        rows = count_rows(path)
    except DataError as err:
        raise DeployError(f"{err}; {DATA_FIX}") from None
    if rows < minimum:
        raise DeployError(f"data file '{path}' holds {rows} data row(s), but a site needs at least {minimum} (one to "
                          "train on and one held out to be evaluated on); add rows to it, or point data_path at the "
                          "site's full data file")
    return rows


def check_data_file(path: str | Path) -> Path:
    """The resolved path of a readable, non-empty .csv or .jsonl data file."""
    from fedpeft.data.loaders import SUPPORTED_SUFFIXES

    file = check_readable_file(path, "data file", DATA_FIX)
    if file.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DeployError(f"data file '{path}' has suffix '{file.suffix}', but fedpeft reads only "
                          f"{', '.join(SUPPORTED_SUFFIXES)} files; convert it to one of them and set data_path to it")
    if file.stat().st_size == 0:
        raise DeployError(f"data file '{path}' is empty (0 bytes); {DATA_FIX}")
    return file


def _verification_fix(message: str, host: str) -> str:
    if "mismatch" in message:
        return (f"connect with a name the certificate lists, or ask the coordinator's operators to re-issue it with "
                f"`fedpeft pki init --host {host}`")
    if "expired" in message or "not yet valid" in message:
        return "check this machine's clock, or ask the coordinator's operators to re-issue it with `fedpeft pki init`"
    return f"make sure the CA file is this federation's ca.pem; otherwise {BUNDLE_FIX}"


def check_tls_endpoint(host: str, port: int, ca_path: str | Path, timeout: float = 5.0) -> None:
    """Connect to ``host:port`` and complete a TLS handshake that verifies the server against ``ca_path``."""
    ca = load_certificate(ca_path, "CA certificate", BUNDLE_FIX)
    check_validity(ca, ca_path, "CA certificate", fix=BUNDLE_FIX)
    context = ssl.create_default_context(cafile=str(Path(ca_path).expanduser().resolve()))
    context.set_alpn_protocols(["h2"])  # as a gRPC client does
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    unreachable = (f"check that the coordinator is running and that the firewall allows outbound connections to "
                   f"port {port}")
    try:
        with (socket.create_connection((host, port), timeout=timeout) as sock,
              context.wrap_socket(sock, server_hostname=host)):
            pass
    except ssl.SSLCertVerificationError as err:
        reason = err.verify_message or str(err)
        raise DeployError(f"the coordinator's certificate at {where} failed verification against '{ca_path}' "
                          f"({reason}); {_verification_fix(reason, host)}") from err
    except ConnectionRefusedError as err:
        raise CoordinatorUnreachable(f"nothing listens at {where} (connection refused); {unreachable}") from err
    except socket.gaierror as err:
        raise DeployError(f"the host name '{host}' cannot be resolved ({err.strerror or err}); check the coordinator "
                          f"address in site.toml and this machine's DNS settings") from err
    except TimeoutError as err:
        raise CoordinatorUnreachable(f"no answer from {where} within {timeout:g} s; {unreachable}") from err
    except ssl.SSLError as err:
        raise DeployError(f"the TLS handshake with {where} failed ({err.reason or err}); check that {where} is the "
                          f"coordinator's Fleet API and that it serves TLS") from err
    except OSError as err:
        raise DeployError(f"cannot connect to {where} ({err.strerror or err}); check the coordinator address and "
                          f"this machine's network") from err
