"""The federation's PKI, made with ``cryptography``: a CA, the coordinator's TLS certificate, and per-site node keys.

Layout of a PKI directory:
    ca.pem, ca.key                  the federation's CA (the key stays with the coordinator's operators)
    audit.key, audit.pub            the coordinator's Ed25519 audit-log key (audit.pub goes to auditors)
    server.pem, server.key          the coordinator's TLS certificate (SANs: the host names/IPs it serves) and key
    sites/<name>/                   one bundle per site, handed to that site's IT team:
        ca.pem                      to verify the coordinator
        node.key, node.pub          the site's node-authentication key pair (OpenSSH format, NIST P-384), as
                                    flower-supernode --auth-supernode-private-key and `flwr supernode register` expect
        audit.key, audit.pub        the site's Ed25519 audit-log key
        site.toml                   the coordinator address and a template of the site's local settings
        policy.toml                 a starting point for the site's own privacy policy (the site edits and owns it)
Private keys are written 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.errors import PkiError
from fedpeft.io.atomic import write_bytes_atomic

CA_DAYS = 3650
SERVER_DAYS = 825
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class SiteBundle:
    directory: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Create the file with mode 0600 from the start (no window where another user could read it), atomically and
    fsync'd; never over an existing file."""
    write_bytes_atomic(path, data, mode=0o600, overwrite=False)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: list[str]):
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def init_pki(directory: str | Path, hosts: list[str]) -> Path:
    """Create the CA and the coordinator's certificate for ``hosts``; refuses to overwrite an existing PKI."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    if (directory / "ca.pem").exists():
        raise PkiError(f"'{directory}' already holds a PKI (ca.pem); use another --dir, or add sites with "
                       "`fedpeft pki add-site`")
    if not hosts:
        raise PkiError("give the host names/IPs the coordinator serves, e.g. --host coordinator.example.org "
                       "--host 10.0.0.5")
    _check_hosts(hosts)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedpeft CA")).issuer_name(_name("fedpeft CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
              .add_extension(_subject_alt_names(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    write_bytes_atomic(directory / "ca.pem", ca.public_bytes(pem), mode=0o644)
    write_bytes_atomic(directory / "server.pem", server.public_bytes(pem), mode=0o644)
    _write_private(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _write_private(directory / "server.key",
                   server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    _new_audit_key(directory / "audit.key")
    return directory


def add_site(directory: str | Path, name: str, coordinator: str) -> SiteBundle:
    """A site's node-authentication key pair and the bundle its IT team receives."""
    directory = Path(directory)
    if not (directory / "ca.pem").is_file():
        raise PkiError(f"'{directory}' has no ca.pem; run `fedpeft pki init --dir {directory} --host ...` first")
    if not SITE_NAME.match(name):
        raise PkiError(f"site name {name!r} must be 1-63 letters, digits, '.', '_' or '-' (it names a directory)")
    _check_coordinator(coordinator)
    bundle = directory / "sites" / name
    if bundle.exists():
        raise PkiError(f"site '{name}' already exists in '{bundle}'; to give it a new key use "
                       f"`fedpeft pki rotate-site {name}`")
    bundle.mkdir(parents=True)
    _new_node_key(bundle)
    _new_audit_key(bundle / "audit.key")
    write_bytes_atomic(bundle / "ca.pem", (directory / "ca.pem").read_bytes(), mode=0o644)
    index = _next_site_index(directory)
    write_bytes_atomic(bundle / "site.toml", _site_template(name, index, coordinator).encode("utf-8"), mode=0o644)
    write_bytes_atomic(bundle / "policy.toml", POLICY_TEMPLATE.encode("utf-8"), mode=0o644)
    return SiteBundle(bundle, bundle / "node.pub")


def _check_hosts(hosts: list[str]) -> None:
    """Each --host is an IP address or a DNS name: the certificate names exactly these, and sites verify them."""
    from fedpeft.deploy.preflight import host_problem

    for host in hosts:
        problem = host_problem(host)
        if problem is not None:
            raise PkiError(f"--host {host!r} {problem}; give a DNS name the sites use to reach the coordinator "
                           "(e.g. coordinator.example.org) or an IP address (e.g. 10.0.0.5), one per --host")
    repeated = sorted({host for host in hosts if hosts.count(host) > 1})
    if repeated:
        raise PkiError(f"--host {', '.join(map(repr, repeated))} is given more than once; give each name once")


def _check_coordinator(coordinator: str) -> None:
    """The address written into every site's bundle: host:port, as the site's agent will dial it."""
    from fedpeft.deploy.preflight import parse_address
    from fedpeft.errors import DeployError

    try:
        parse_address(coordinator, "--coordinator")
    except DeployError as err:
        raise PkiError(str(err)) from None


def _new_audit_key(path: Path) -> None:
    """The Ed25519 key that signs the writer's audit log (Flower's node keys must be EC, so it is a key of its own)."""
    from fedpeft.audit.keys import generate_key, save_private_key

    save_private_key(generate_key(), path)


def _next_site_index(directory: Path) -> int:
    """One more than any index given before, removed sites included: a site's index is never reused."""
    import tomllib

    used = [-1]
    for config in [*directory.glob("sites/*/site.toml"), *directory.glob("removed/*/site.toml")]:
        try:
            used.append(int(tomllib.loads(config.read_text(encoding="utf-8"))["site"]["index"]))
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError):
            continue  # a hand-edited file without an index claims none
    return max(used) + 1


def _new_node_key(bundle: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(bundle / "node.key", key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()))
    write_bytes_atomic(bundle / "node.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH) + b"\n",
                       mode=0o644)


def _existing_bundle(directory: str | Path, name: str) -> Path:
    bundle = Path(directory) / "sites" / name
    if not SITE_NAME.match(name) or not (bundle / "node.pub").is_file():
        raise PkiError(f"'{bundle}' is not a site bundle (no node.pub); list the sites with "
                       f"`ls {Path(directory)}/sites`")
    return bundle


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def rotate_site(directory: str | Path, name: str) -> SiteBundle:
    """A new node key pair for an existing site; the old pair is kept as *.retired-<time> (mode unchanged)."""
    bundle = _existing_bundle(directory, name)
    stamp = _stamp()
    for file in ("node.key", "node.pub"):
        (bundle / file).rename(bundle / f"{file}.retired-{stamp}")
    _new_node_key(bundle)
    return SiteBundle(bundle, bundle / "node.pub")


def remove_site(directory: str | Path, name: str) -> Path:
    """Move the site's bundle to <pki>/removed/; the coordinator unregisters its key at its next start."""
    bundle = _existing_bundle(directory, name)
    target = Path(directory) / "removed" / f"{name}-{_stamp()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    bundle.rename(target)
    return target


def _site_template(name: str, index: int, coordinator: str) -> str:
    return f"""# fedpeft site agent settings for site '{name}' -- edit the paths to this site's own files.
# Relative paths are relative to this file. Start the agent with: fedpeft client --site-config site.toml
[site]
name = "{name}"
index = {index}                          # this site's number in the federation (seeds, metrics); do not change
coordinator = "{coordinator}"        # host:port of the coordinator (outbound connection only)
root_certificates = "ca.pem"
node_key = "node.key"
data_path = "/path/to/local/data.csv"
base_model = ""                      # empty: the run's model; or this site's local copy (a directory)
ledger_path = "privacy_ledger.jsonl"
policy_file = "policy.toml"
state_dir = "agent-state"            # the agent's working files (installed app, logs)
audit_log = "audit.jsonl"            # the site's signed record of what left it (fedpeft audit verify)
audit_key = "audit.key"              # the Ed25519 key that signs it; audit.pub goes to auditors
local_port = 9094                    # local-only port between the agent's processes; change if taken
"""


POLICY_TEMPLATE = """# This site's own privacy policy; it beats the coordinator's run config (docs/privacy.md).
[policy]
max_epsilon = 8.0
delta = 1e-5
require_dp = true
min_noise_multiplier = 0.5
max_grad_norm = 1.0
allowed_peft_methods = ["lora"]
client_dp_requires_secure_aggregation = true
"""
