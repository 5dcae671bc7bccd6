"""The PKI made by `fedpeft pki`: a CA that signed the coordinator certificate for its hosts, 0600 private keys that
are never printed, and site keys, born at the site, in the formats Flower's SuperNode and CLI load."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedpeft.cli import main as cli_main
from fedpeft.privacy.policy import load_policy


def _init(tmp_path, capsys):
    pki = tmp_path / "pki"
    assert cli_main(["pki", "init", "--dir", str(pki), "--host", "coordinator.local", "--host", "127.0.0.1"]) == 0
    return pki


def _keys(tmp_path, site: str) -> list[str]:
    """The site makes its keys (`fedpeft client keygen`); the add-site options naming the public keys it sends."""
    out = tmp_path / f"keys-{site}"
    assert cli_main(["client", "keygen", "--out", str(out)]) == 0
    return ["--public-key", str(out / "node.pub"), "--audit-public-key", str(out / "audit.pub")]


def test_ca_signs_the_coordinator_certificate_for_its_hosts(tmp_path, capsys):
    pki = _init(tmp_path, capsys)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in capsys.readouterr().out


def test_site_keys_are_flower_loadable_and_the_bundle_has_a_valid_policy(tmp_path, capsys):
    pki = _init(tmp_path, capsys)
    keys = _keys(tmp_path, "hospital-a")
    assert cli_main(["pki", "add-site", "hospital-a", "--dir", str(pki), "--coordinator", "127.0.0.1:9092",
                     *keys]) == 0
    bundle, site = pki / "sites" / "hospital-a", tmp_path / "keys-hospital-a"
    private = load_ssh_private_key((site / "node.key").read_bytes(), password=None)
    public = load_ssh_public_key((bundle / "node.pub").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE((site / "node.key").stat().st_mode) == 0o600
    assert not (bundle / "node.key").exists() and not (bundle / "audit.key").exists()
    assert (bundle / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    assert 'coordinator = "127.0.0.1:9092"' in (bundle / "site.toml").read_text()
    assert load_policy(bundle / "policy.toml").max_epsilon == 8.0
    out = capsys.readouterr().out
    assert "PRIVATE KEY" not in out and "hospital-a" in out


def test_clear_errors_and_nothing_is_overwritten(tmp_path, capsys):
    pki = _init(tmp_path, capsys)
    before = (pki / "ca.key").read_bytes()
    assert cli_main(["pki", "init", "--dir", str(pki), "--host", "x"]) == 2
    assert (pki / "ca.key").read_bytes() == before
    keys = _keys(tmp_path, "bank-1")
    assert cli_main(["pki", "add-site", "bank-1", "--dir", str(pki), "--coordinator", "h:1", *keys]) == 0
    assert cli_main(["pki", "add-site", "bank-1", "--dir", str(pki), "--coordinator", "h:1", *keys]) == 2
    assert cli_main(["pki", "add-site", "../evil", "--dir", str(pki), "--coordinator", "h:1"]) == 2
    assert cli_main(["pki", "add-site", "s", "--dir", str(tmp_path / "none"), "--coordinator", "h:1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a PKI" in err and "already exists" in err and "must be 1-63" in err and "pki init" in err


def test_init_needs_a_host(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["pki", "init", "--dir", str(tmp_path / "p")])


def test_rotate_and_remove_keep_indexes_unique_and_retire_old_keys(tmp_path, capsys):
    import tomllib

    from fedpeft.deploy.pki import add_site, init_pki, remove_site, rotate_site, site_keygen
    from fedpeft.deploy.site_keys import SitePublicKeys

    pki = init_pki(tmp_path / "pki", ["127.0.0.1"])
    def sent(name):  # the public keys the site made with keygen
        return SitePublicKeys(tmp_path / name / "node.pub", tmp_path / name / "audit.pub")

    for name in ("a", "b", "c", "d"):
        site_keygen(tmp_path / name)
    for name in ("a", "b", "c"):
        add_site(pki, name, "127.0.0.1:9092", sent(name))
    old_pub = (pki / "sites" / "b" / "node.pub").read_text()
    site_keygen(tmp_path / "b", force=True, node_only=True)  # at the site: a new node key, the audit key kept
    rotate_site(pki, "b", tmp_path / "b" / "node.pub")
    retired = sorted(p.name for p in (pki / "sites" / "b").glob("node.*.retired-*"))
    assert len(retired) == 1 and retired[0].startswith("node.pub.retired-"), "no private key here to retire"
    assert (pki / "sites" / "b" / "node.pub").read_text() == (tmp_path / "b" / "node.pub").read_text() != old_pub
    assert not list((pki / "sites" / "b").glob("*.key*"))
    moved = remove_site(pki, "b")
    assert moved.parent.name == "removed" and not (pki / "sites" / "b").exists()
    add_site(pki, "d", "127.0.0.1:9092", sent("d"))

    def index(path):
        return tomllib.loads(path.read_text())["site"]["index"]

    assert index(pki / "sites" / "d" / "site.toml") == 3, "a removed site's index is never given again"
    assert cli_main(["pki", "rotate-site", "nope", "--dir", str(pki)]) == 2
    assert "is not a site bundle" in capsys.readouterr().err
