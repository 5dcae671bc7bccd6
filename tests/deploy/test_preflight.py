"""Pre-flight checks: each misconfiguration a coordinator or site can have is caught before Flower starts, with a
message that names the file or address, the value found, and the fix."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pathlib
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedpeft.deploy import preflight
from fedpeft.deploy.pki import add_site, init_pki
from fedpeft.deploy.preflight import (
    check_data_file,
    check_node_key,
    check_readable_file,
    check_server_certificate,
    check_tls_endpoint,
    check_validity,
    load_certificate,
    parse_address,
)
from fedpeft.errors import DeployError

UTC = dt.UTC


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = init_pki(tmp_path_factory.mktemp("pki") / "pki", ["coordinator.local", "127.0.0.1"])
    add_site(directory, "hospital-a", "127.0.0.1:9092")
    return directory


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    """Another federation's PKI: same CA name, another key; its certificate names only coordinator.local."""
    return init_pki(tmp_path_factory.mktemp("other") / "pki", ["coordinator.local"])


def _pem_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _issue(out: Path, ca_cert: x509.Certificate, ca_key, public_key, *, start: dt.datetime,
           end: dt.datetime, hosts: tuple[str, ...] = ("coordinator.local",)) -> Path:
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "c")]))
               .issuer_name(ca_cert.subject).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
    out.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return out


def _issue_from(pki: Path, out: Path, *, days: tuple[int, int] = (-1, 30), hosts=("coordinator.local",)) -> Path:
    now = dt.datetime.now(UTC)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    return _issue(out, ca, _pem_key(pki / "ca.key"), _pem_key(pki / "server.key").public_key(),
                  start=now + dt.timedelta(days=days[0]), end=now + dt.timedelta(days=days[1]), hosts=hosts)


# ---- files and certificates -------------------------------------------------------------------------------------


def test_readable_file_names_the_path_the_problem_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DeployError, match=r"data file '.*nope\.csv' does not exist; fix it"):
        check_readable_file(tmp_path / "nope.csv", "data file", "fix it")
    with pytest.raises(DeployError, match=r"is not a file; fix it"):
        check_readable_file(tmp_path, "data file", "fix it")
    (tmp_path / "x.csv").write_text("a\n")
    assert check_readable_file(tmp_path / "x.csv", "data file", "fix it") == (tmp_path / "x.csv").resolve()

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "open", denied)
    with pytest.raises(DeployError, match=r"'.*x\.csv' cannot be read \(Permission denied\); fix it"):
        check_readable_file(tmp_path / "x.csv", "data file", "fix it")


def test_garbage_pem_is_named_with_its_first_line(tmp_path):
    (tmp_path / "ca.pem").write_text("garbage, not a certificate\n")
    with pytest.raises(DeployError, match=r"CA certificate '.*ca\.pem' is not a PEM certificate "
                                          r"\(its first line is 'garbage, not a certificate'\); .*pki init"):
        load_certificate(tmp_path / "ca.pem", "CA certificate")


def test_validity_window_states_both_dates(pki):
    cert = load_certificate(pki / "server.pem", "coordinator certificate")
    before = cert.not_valid_before_utc
    check_validity(cert, "server.pem", "coordinator certificate")
    check_validity(cert, "server.pem", "coordinator certificate", now=before.replace(tzinfo=None))  # naive = UTC
    with pytest.raises(DeployError, match=rf"'server\.pem' is not valid yet \(valid from {before:%Y-%m-%d}.*clock"):
        check_validity(cert, "server.pem", "coordinator certificate", now=before - dt.timedelta(days=1))
    with pytest.raises(DeployError, match=rf"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"):
        check_validity(cert, "server.pem", "coordinator certificate", now=before + dt.timedelta(days=3000))


def test_a_fresh_pki_passes_and_returns_the_served_names(pki):
    sans = check_server_certificate(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    assert sans == ["coordinator.local", "127.0.0.1"]


def test_an_expired_server_certificate_is_refused(pki, tmp_path):
    expired = _issue_from(pki, tmp_path / "expired.pem", days=(-30, -1))
    with pytest.raises(DeployError, match=r"coordinator certificate '.*expired\.pem' expired on .*pki init"):
        check_server_certificate(expired, pki / "server.key", pki / "ca.pem")


def test_a_certificate_from_another_ca_is_refused(pki, other):
    with pytest.raises(DeployError, match=r"'.*other.*server\.pem' is not signed by this CA \('.*ca\.pem'"):
        check_server_certificate(other / "server.pem", pki / "server.key", pki / "ca.pem")


def test_a_key_that_does_not_match_the_certificate_is_refused(pki, other):
    with pytest.raises(DeployError, match=r"private key '.*server\.key' \(public key sha256:[0-9a-f]{16}\) does not "
                                          r"belong to certificate '.*server\.pem'"):
        check_server_certificate(pki / "server.pem", other / "server.key", pki / "ca.pem")


def test_unreadable_or_garbage_server_files_are_named(pki, tmp_path):
    (tmp_path / "server.key").write_text("garbage\n")
    with pytest.raises(DeployError, match=r"private key '.*server\.key' is not a PEM private key"):
        check_server_certificate(pki / "server.pem", tmp_path / "server.key", pki / "ca.pem")
    with pytest.raises(DeployError, match=r"CA certificate '.*missing\.pem' does not exist"):
        check_server_certificate(pki / "server.pem", pki / "server.key", tmp_path / "missing.pem")


def test_a_certificate_without_host_names_is_refused(pki, tmp_path):
    bare = _issue_from(pki, tmp_path / "bare.pem", hosts=())
    with pytest.raises(DeployError, match=r"'.*bare\.pem' lists no host names"):
        check_server_certificate(bare, pki / "server.key", pki / "ca.pem")


def test_an_rsa_ca_is_verified_and_a_foreign_issuer_named(pki, tmp_path):
    now = dt.datetime.now(UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rsa CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
          .sign(ca_key, hashes.SHA256()))
    (tmp_path / "rsa-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = _issue(tmp_path / "server.pem", ca, ca_key, _pem_key(pki / "server.key").public_key(),
                    start=now - dt.timedelta(days=1), end=now + dt.timedelta(days=9), hosts=("a.example", "b.example"))
    assert check_server_certificate(server, pki / "server.key", tmp_path / "rsa-ca.pem") == ["a.example", "b.example"]
    with pytest.raises(DeployError, match=r"'.*server\.pem' was issued by 'CN=rsa CA', not by the CA '.*pki.*ca\.pem'"):
        check_server_certificate(server, pki / "server.key", pki / "ca.pem")


def test_a_certificate_signed_without_a_hash_is_not_signed_by_an_ec_ca(pki, tmp_path):
    """An Ed25519 signature names no hash: no EC or RSA CA made it (before: a TypeError from cryptography)."""
    now = dt.datetime.now(UTC)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    forged = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "c")]))
              .issuer_name(ca.subject).public_key(_pem_key(pki / "server.key").public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
              .not_valid_after(now + dt.timedelta(days=9))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("coordinator.local")]), critical=False)
              .sign(ed25519.Ed25519PrivateKey.generate(), None))
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(DeployError, match=r"'.*forged\.pem' is not signed by this CA"):
        check_server_certificate(tmp_path / "forged.pem", pki / "server.key", pki / "ca.pem")


# ---- the site's node key ----------------------------------------------------------------------------------------


def test_the_site_node_key_yields_its_public_key(pki):
    bundle = pki / "sites" / "hospital-a"
    assert check_node_key(bundle / "node.key") == (bundle / "node.pub").read_text().strip()


def test_a_node_key_readable_by_others_must_be_chmod_600(pki, tmp_path):
    key = Path(shutil.copy(pki / "sites" / "hospital-a" / "node.key", tmp_path / "node.key"))
    key.chmod(0o644)
    with pytest.raises(DeployError, match=r"'.*node\.key' has mode 0644, .*`chmod 600 .*node\.key`"):
        check_node_key(key)


def _write_0600(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def test_node_keys_flower_cannot_use_are_refused(pki, tmp_path):
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    with pytest.raises(DeployError, match=r"'.*ed\.key' is a Ed25519 key, .*needs an EC key.*pki add-site"):
        check_node_key(_write_0600(tmp_path / "ed.key", ed))
    pem = _write_0600(tmp_path / "pem.key", (pki / "server.key").read_bytes())
    with pytest.raises(DeployError, match=r"'.*pem\.key' is not an OpenSSH private key \(its first line is "
                                          r"'-----BEGIN PRIVATE KEY-----'\)"):
        check_node_key(pem)
    with pytest.raises(DeployError, match=r"site node key '.*absent\.key' does not exist; ask the coordinator"):
        check_node_key(tmp_path / "absent.key")


def test_an_other_curve_ec_key_is_accepted(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    assert check_node_key(_write_0600(tmp_path / "p256.key", data)).startswith("ecdsa-sha2-nistp256 ")


# ---- addresses and data files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("coordinator.example.org:9092", ("coordinator.example.org", 9092)),
    (" 10.0.0.5:1 ", ("10.0.0.5", 1)),
    ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
])
def test_good_addresses_parse(text, expected):
    assert parse_address(text, "coordinator") == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("coordinator.example.org", "has no port"),
    (":9092", "has no host"),
    ("host:", "port '' that is not a whole number"),
    ("host:abc", "port 'abc' that is not a whole number"),
    ("host:0", "port 0, outside 1-65535"),
    ("host:65536", "port 65536, outside 1-65535"),
    ("2001:db8::1:9092", "IPv6 address without brackets"),
    ("[2001:db8::1]9092", "no ']:port'"),
    ("https://host:9092", "includes a scheme ('https://')"),
    ("my host:9092", "invalid host 'my host'"),
])
def test_bad_addresses_name_the_text_and_show_an_example(text, fragment):
    with pytest.raises(DeployError) as caught:
        parse_address(text, "coordinator")
    message = str(caught.value)
    assert message.startswith(f"coordinator '{text}' ")
    assert fragment in message
    assert "coordinator.example.org:9092" in message


def test_data_files_must_be_nonempty_csv_or_jsonl(tmp_path):
    (tmp_path / "notes.txt").write_text("text,label\n")
    with pytest.raises(DeployError, match=r"'.*notes\.txt' has suffix '\.txt', .*reads only \.csv, \.jsonl files"):
        check_data_file(tmp_path / "notes.txt")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DeployError, match=r"'.*empty\.csv' is empty \(0 bytes\); set data_path"):
        check_data_file(tmp_path / "empty.csv")
    with pytest.raises(DeployError, match=r"data file '.*missing\.jsonl' does not exist; set data_path"):
        check_data_file(tmp_path / "missing.jsonl")
    (tmp_path / "DATA.JSONL").write_text('{"text": "a", "label": "b"}\n')
    assert check_data_file(tmp_path / "DATA.JSONL") == (tmp_path / "DATA.JSONL").resolve()


# ---- reaching the coordinator -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _tls_server(pki: Path, outcome: list[str]):
    """A TLS server on 127.0.0.1 serving ``pki``'s coordinator certificate for one connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(3)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(3)
            with context.wrap_socket(conn, server_side=True):
                outcome.append("handshake")
        except (OSError, ssl.SSLError) as err:
            outcome.append(f"failed: {err}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(3)
        listener.close()


def test_a_tls_handshake_with_the_right_ca_succeeds(pki):
    outcome: list[str] = []
    with _tls_server(pki, outcome) as port:
        check_tls_endpoint("127.0.0.1", port, pki / "sites" / "hospital-a" / "ca.pem", timeout=2)
    assert outcome == ["handshake"]


def test_another_federations_ca_fails_certificate_verification(pki, other):
    with _tls_server(pki, []) as port, pytest.raises(DeployError) as caught:
        check_tls_endpoint("127.0.0.1", port, other / "ca.pem", timeout=2)
    message = str(caught.value)
    assert f"certificate at 127.0.0.1:{port} failed verification against '{other / 'ca.pem'}'" in message
    assert "this federation's ca.pem" in message


def test_a_host_the_certificate_does_not_name_fails_verification(other):
    with _tls_server(other, []) as port, pytest.raises(DeployError) as caught:
        check_tls_endpoint("127.0.0.1", port, other / "ca.pem", timeout=2)
    assert "IP address mismatch" in str(caught.value)
    assert "`fedpeft pki init --host 127.0.0.1`" in str(caught.value)


def test_a_refused_port_says_nothing_listens(pki):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(DeployError, match=rf"nothing listens at 127\.0\.0\.1:{port} .*firewall .*port {port}"):
        check_tls_endpoint("127.0.0.1", port, pki / "ca.pem", timeout=2)


def test_a_silent_server_times_out(pki):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts into its backlog, never answers
        port = silent.getsockname()[1]
        with pytest.raises(DeployError, match=rf"no answer from 127\.0\.0\.1:{port} within 0\.3 s"):
            check_tls_endpoint("127.0.0.1", port, pki / "ca.pem", timeout=0.3)


def test_a_plaintext_server_fails_the_handshake(pki):
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_plaintext() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer_plaintext, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(DeployError, match=rf"TLS handshake with 127\.0\.0\.1:{port} failed .*serves TLS"):
            check_tls_endpoint("127.0.0.1", port, pki / "ca.pem", timeout=2)
    finally:
        thread.join(3)
        listener.close()


def test_an_unresolvable_host_is_named(pki, monkeypatch):
    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(preflight.socket, "create_connection", unresolvable)
    with pytest.raises(DeployError, match=r"host name 'coordinator\.invalid' cannot be resolved \(Name or service"):
        check_tls_endpoint("coordinator.invalid", 9092, pki / "ca.pem")


def test_a_garbage_ca_file_is_named_before_connecting(tmp_path):
    (tmp_path / "ca.pem").write_text("nonsense\n")
    with pytest.raises(DeployError, match=r"CA certificate '.*ca\.pem' is not a PEM certificate .*pki add-site"):
        check_tls_endpoint("127.0.0.1", 9, tmp_path / "ca.pem")
