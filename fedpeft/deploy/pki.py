"""The federation's PKI, made with ``cryptography``: a CA, the coordinator's TLS certificate, the sites' public keys,
and the site's own key pairs (`fedpeft client keygen`, run at the site).

Keys are born at the site: a site makes its node and audit key pairs itself (``site_keygen``) and sends only the two
public keys; ``add_site`` registers them. The coordinator never holds a site's private key (`fedpeft server`
refuses to start while its PKI folder holds one: ``fedpeft.deploy.site_keys``).

Layout of a PKI directory (the coordinator's):
    ca.pem, ca.key                  the federation's CA (the key stays with the coordinator's operators)
    audit.key, audit.pub            the coordinator's Ed25519 audit-log key (audit.pub goes to auditors)
    server.pem, server.key          the coordinator's TLS certificate (SANs: the host names/IPs it serves) and key
    sites/<name>/                   one per site; ca.pem, site.toml and policy.toml go back to the site's IT team:
        ca.pem                      to verify the coordinator
        node.pub                    the site's node-authentication public key (OpenSSH, EC), registered with Flower
        audit.pub                   the site's Ed25519 audit public key (auditors and cross-checks use it)
        site.toml                   the coordinator address and a template of the site's local settings
        policy.toml                 a starting point for the site's own privacy policy (the site edits and owns it)
At the site (`fedpeft client keygen --out DIR`): node.key, node.pub (OpenSSH format, NIST P-384, as
flower-supernode --auth-supernode-private-key expects) and audit.key, audit.pub. Private keys are written 0600 and
never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.deploy.site_keys import (
    AUDIT_KEY,
    AUDIT_PUB,
    NODE_KEY,
    NODE_PUB,
    SitePublicKeys,
    check_keys_unused,
    read_audit_public_key,
    read_node_public_key,
)
from fedpeft.errors import PkiError
from fedpeft.io.atomic import write_bytes_atomic

CA_DAYS = 3650
SERVER_DAYS = 825
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class SiteBundle:
    directory: Path
    public_key: Path


@dataclass(frozen=True)
class SiteKeyFiles:
    """What `fedpeft client keygen` made at the site: the private keys stay, the public ones go to the coordinator."""

    directory: Path
    private: tuple[Path, ...]
    public: tuple[Path, ...]
    retired: tuple[Path, ...]  # earlier keys moved aside by --force


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


def check_new_site(directory: str | Path, name: str, coordinator: str) -> Path:
    """The bundle directory a new site ``name`` gets; PkiError when the PKI, the name or the address is wrong."""
    directory = Path(directory)
    if not (directory / "ca.pem").is_file():
        raise PkiError(f"'{directory}' has no ca.pem; run `fedpeft pki init --dir {directory} --host ...` first")
    if not SITE_NAME.match(name):
        raise PkiError(f"site name {name!r} must be 1-63 letters, digits, '.', '_' or '-' (it names a directory)")
    _check_coordinator(coordinator)
    bundle = directory / "sites" / name
    if bundle.exists():
        raise PkiError(f"site '{name}' already exists in '{bundle}'; to register a new key use "
                       f"`fedpeft pki rotate-site {name} --public-key NODE_PUB`")
    return bundle


def add_site(directory: str | Path, name: str, coordinator: str,
             public_keys: SitePublicKeys | None = None) -> SiteBundle:
    """Register a site from the public keys it made itself (``public_keys``) and write the bundle for its IT team
    (ca.pem, site.toml, policy.toml; node.pub and audit.pub stay as the coordinator's record). No private key.

    ``public_keys=None`` is for tests and demos only: the coordinator then makes the site's key pairs in the bundle
    and so holds the site's private keys, and `fedpeft server` refuses to start on such a PKI."""
    directory = Path(directory)
    bundle = check_new_site(directory, name, coordinator)
    if public_keys is not None:  # read and checked before anything is written: a bad key leaves no bundle behind
        node_line = read_node_public_key(public_keys.node)
        audit_b64 = read_audit_public_key(public_keys.audit)
        check_keys_unused(directory, node_line, audit_b64, name)
    bundle.mkdir(parents=True)
    if public_keys is None:
        new_node_key_pair(bundle)
        _new_audit_key(bundle / AUDIT_KEY)
    else:
        write_bytes_atomic(bundle / NODE_PUB, (node_line + "\n").encode("ascii"), mode=0o644)
        write_bytes_atomic(bundle / AUDIT_PUB, (audit_b64 + "\n").encode("ascii"), mode=0o644)
    write_bytes_atomic(bundle / "ca.pem", (directory / "ca.pem").read_bytes(), mode=0o644)
    index = _next_site_index(directory)
    write_bytes_atomic(bundle / "site.toml", _site_template(name, index, coordinator).encode("utf-8"), mode=0o644)
    write_bytes_atomic(bundle / "policy.toml", POLICY_TEMPLATE.encode("utf-8"), mode=0o644)
    return SiteBundle(bundle, bundle / NODE_PUB)


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


def new_node_key_pair(directory: Path) -> None:
    """node.key (0600) and node.pub: NIST P-384 in OpenSSH format, as Flower's SuperNode and `flwr supernode
    register` load them (Flower 1.41 takes EC keys only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(directory / NODE_KEY, key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.OpenSSH,
                                                           serialization.NoEncryption()))
    write_bytes_atomic(directory / NODE_PUB, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                          serialization.PublicFormat.OpenSSH) + b"\n",
                       mode=0o644)


def site_keygen(out: str | Path, *, force: bool = False, node_only: bool = False) -> SiteKeyFiles:
    """At the site: its node key pair and (unless ``node_only``) its audit key pair in ``out``, private keys 0600.

    Existing keys are never overwritten: without ``force`` PkiError names them; with it they are moved aside as
    *.retired-<time> first (a mistaken --force loses nothing)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PkiError(f"--out '{out}' is a file; give the directory that holds (or will hold) the site's bundle")
    names = (NODE_KEY, NODE_PUB) if node_only else (NODE_KEY, NODE_PUB, AUDIT_KEY, AUDIT_PUB)
    existing = [out / name for name in names if (out / name).exists()]
    if existing and not force:
        raise PkiError(f"{', '.join(str(p) for p in existing)} already exist(s); keygen never overwrites a key. "
                       "Use another --out, or --force to make new keys (the old files are kept as *.retired-<time>; "
                       "the coordinator must then register the new node.pub with `fedpeft pki rotate-site`)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new directory readable by its owner only
    stamp = _stamp()
    retired = []
    for path in existing:
        retired.append(path.with_name(f"{path.name}.retired-{stamp}"))
        path.rename(retired[-1])
    new_node_key_pair(out)
    if not node_only:
        _new_audit_key(out / AUDIT_KEY)
    private = tuple(out / n for n in names if n.endswith(".key"))
    public = tuple(out / n for n in names if n.endswith(".pub"))
    return SiteKeyFiles(out, private, public, tuple(retired))


def existing_bundle(directory: str | Path, name: str) -> Path:
    bundle = Path(directory) / "sites" / name
    if not SITE_NAME.match(name) or not (bundle / NODE_PUB).is_file():
        raise PkiError(f"'{bundle}' is not a site bundle (no node.pub); list the sites with "
                       f"`ls {Path(directory)}/sites`")
    return bundle


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def rotate_site(directory: str | Path, name: str, node_public_key: str | Path | None = None,
                audit_public_key: str | Path | None = None) -> SiteBundle:
    """Register the new node public key a site made (``node_public_key``; and a new audit public key, if given) for
    an existing site; the old files are kept as *.retired-<time>. The coordinator swaps the registered key at its
    next start. ``node_public_key=None`` is for tests and demos only: the coordinator makes the new key pair."""
    bundle = existing_bundle(directory, name)
    if node_public_key is not None:  # checked before anything moves
        node_line = read_node_public_key(node_public_key)
        audit_b64 = read_audit_public_key(audit_public_key) if audit_public_key is not None else None
        check_keys_unused(Path(directory), node_line, audit_b64, name)
    elif audit_public_key is not None:
        raise PkiError("--audit-public-key needs --public-key: a rotation always registers a new node key")
    stamp = _stamp()
    moved = (NODE_KEY, NODE_PUB) + ((AUDIT_KEY, AUDIT_PUB) if audit_public_key is not None else ())
    for file in moved:
        if (bundle / file).exists():  # a site registered from public keys has no node.key here
            (bundle / file).rename(bundle / f"{file}.retired-{stamp}")
    if node_public_key is None:
        new_node_key_pair(bundle)
    else:
        write_bytes_atomic(bundle / NODE_PUB, (node_line + "\n").encode("ascii"), mode=0o644)
        if audit_b64 is not None:
            write_bytes_atomic(bundle / AUDIT_PUB, (audit_b64 + "\n").encode("ascii"), mode=0o644)
    return SiteBundle(bundle, bundle / NODE_PUB)


def remove_site(directory: str | Path, name: str) -> Path:
    """Move the site's bundle to <pki>/removed/; the coordinator unregisters its key at its next start."""
    bundle = existing_bundle(directory, name)
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
# The site's own private keys, made here by `fedpeft client keygen` (never sent to the coordinator): beside this file
# when keygen's --out is this directory, or give their paths.
node_key = "node.key"
data_path = "/path/to/local/data.csv"
base_model = ""                      # empty: the run's model; or this site's local copy (a directory)
ledger_path = "privacy_ledger.jsonl"
policy_file = "policy.toml"
state_dir = "agent-state"            # the agent's working files (installed app, logs)
audit_log = "audit.jsonl"            # the site's signed record of what left it (fedpeft audit verify)
audit_key = "audit.key"              # the Ed25519 key that signs it (keygen made it); audit.pub goes to auditors
# local_port = 9094                  # loopback port between the agent's processes; default 9094 + index, so that
                                     # sites on one host do not collide; set it if that one is taken
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
