"""Keys born at the site: `fedpeft client keygen` makes them there, `fedpeft pki add-site` registers only their public
halves, and `fedpeft server` refuses a PKI folder that holds any site private key. Real keys, the real CLI."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedpeft.audit.keys import load_private_key, load_public_key, public_key_b64
from fedpeft.cli import main as cli_main
from fedpeft.deploy.pki import init_pki
from fedpeft.deploy.site_keys import check_no_site_private_keys, find_site_private_keys
from fedpeft.errors import DeployError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _keygen(out, *extra: str) -> int:
    return cli_main(["client", "keygen", "--out", str(out), *extra])


def _add_site(pki, name: str, keys, *extra: str) -> int:
    return cli_main(["pki", "add-site", name, "--dir", str(pki), "--coordinator", "127.0.0.1:9092",
                     "--public-key", str(keys / "node.pub"), "--audit-public-key", str(keys / "audit.pub"), *extra])


@pytest.fixture
def pki(tmp_path):
    return init_pki(tmp_path / "pki", ["127.0.0.1"])


# ---- the site: fedpeft client keygen -----------------------------------------------------------------------------

def test_keygen_as_a_process_makes_0600_private_keys_and_says_what_to_send(tmp_path):
    out = tmp_path / "site" / "keys"
    done = subprocess.run([sys.executable, "-m", "fedpeft.cli", "client", "keygen", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert _mode(out / "node.key") == 0o600 and _mode(out / "audit.key") == 0o600 and _mode(out) == 0o700
    assert _mode(out / "node.pub") == 0o644 and _mode(out / "audit.pub") == 0o644
    node = serialization.load_ssh_private_key((out / "node.key").read_bytes(), password=None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert node.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) \
        == (out / "node.pub").read_bytes().strip()
    assert public_key_b64(load_private_key(out / "audit.key")) == load_public_key(out / "audit.pub")
    said = done.stdout
    assert "PRIVATE KEY" not in said and "BEGIN" not in said, "a key is never printed"
    assert str(out / "node.pub") in said and str(out / "audit.pub") in said
    assert "NEVER send" in said and str(out / "node.key") in said and str(out / "audit.key") in said


def test_keygen_refuses_to_overwrite_and_force_keeps_the_old_keys(tmp_path, capsys):
    out = tmp_path / "keys"
    assert _keygen(out) == 0
    before = {name: (out / name).read_bytes() for name in ("node.key", "audit.key")}
    assert _keygen(out) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and str(out / "node.key") in err and "--force" in err
    assert {name: (out / name).read_bytes() for name in before} == before

    assert _keygen(out, "--force", "--node-key-only") == 0  # a node-key rotation: the audit key stays
    assert (out / "audit.key").read_bytes() == before["audit.key"]
    assert (out / "node.key").read_bytes() != before["node.key"]
    retired = sorted(p.name for p in out.glob("node.key.retired-*"))
    assert len(retired) == 1 and (out / retired[0]).read_bytes() == before["node.key"]
    assert _mode(out / retired[0]) == 0o600

    (tmp_path / "file").write_text("x")
    assert _keygen(tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err


# ---- the coordinator: fedpeft pki add-site from public keys ----------------------------------------------------

def test_add_site_from_public_keys_writes_a_bundle_without_any_private_key(tmp_path, pki, capsys):
    keys = tmp_path / "site-keys"
    assert _keygen(keys) == 0
    assert _add_site(pki, "hospital-a", keys) == 0
    bundle = pki / "sites" / "hospital-a"
    assert sorted(p.name for p in bundle.iterdir()) == ["audit.pub", "ca.pem", "node.pub", "policy.toml",
                                                         "site.toml"]
    for file in bundle.iterdir():
        assert b"PRIVATE KEY" not in file.read_bytes(), file
    assert find_site_private_keys(pki) == []
    check_no_site_private_keys(pki)
    assert (bundle / "node.pub").read_text() == (keys / "node.pub").read_text()
    assert load_public_key(bundle / "audit.pub") == load_public_key(keys / "audit.pub")
    said = capsys.readouterr().out
    assert "ca.pem, site.toml, policy.toml" in said and "require_dp" in said and "privacy.dp = true" in said


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing", "--public-key and --audit-public-key missing"),
    ("node-private", "is a PRIVATE key: it must never leave the site"),
    ("audit-private", "is a PRIVATE key: it must never leave the site"),
    ("not-ec", "is a Ed25519 key, but Flower's node authentication needs an EC key"),
    ("garbage", "does not hold a base64 Ed25519 public key"),
    ("absent", "does not exist"),
])
def test_add_site_refuses_anything_but_the_sites_two_public_keys(tmp_path, pki, capsys, case, fragment):
    keys = tmp_path / "site-keys"
    assert _keygen(keys) == 0
    node, audit = keys / "node.pub", keys / "audit.pub"
    if case == "node-private":
        node = keys / "node.key"
    elif case == "audit-private":
        audit = keys / "audit.key"
    elif case == "not-ec":
        node = tmp_path / "ed.pub"
        node.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    elif case == "garbage":
        audit = tmp_path / "garbage.pub"
        audit.write_text("not a key\n")
    elif case == "absent":
        node = tmp_path / "absent.pub"
    argv = ["pki", "add-site", "s", "--dir", str(pki), "--coordinator", "127.0.0.1:9092"]
    if case != "missing":
        argv += ["--public-key", str(node), "--audit-public-key", str(audit)]
    assert cli_main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert not (pki / "sites").exists(), "a refused key leaves no bundle behind"


def test_two_sites_cannot_share_a_key(tmp_path, pki, capsys):
    keys = tmp_path / "site-keys"
    assert _keygen(keys) == 0
    assert _add_site(pki, "a", keys) == 0
    assert _add_site(pki, "b", keys) == 2
    assert "already holds this public key (the key of site 'a')" in capsys.readouterr().err
    assert not (pki / "sites" / "b").exists()


def test_rotate_site_registers_the_sites_new_node_key(tmp_path, pki, capsys):
    keys = tmp_path / "site-keys"
    assert _keygen(keys) == 0 and _add_site(pki, "a", keys) == 0
    bundle = pki / "sites" / "a"
    old = (bundle / "node.pub").read_text()
    assert cli_main(["pki", "rotate-site", "a", "--dir", str(pki)]) == 2
    assert "--public-key missing" in capsys.readouterr().err
    assert cli_main(["pki", "rotate-site", "a", "--dir", str(pki), "--public-key", str(keys / "node.pub")]) == 2
    assert "this site's current key" in capsys.readouterr().err, "the same key again is not a rotation"
    assert _keygen(keys, "--force", "--node-key-only") == 0
    assert cli_main(["pki", "rotate-site", "a", "--dir", str(pki), "--public-key", str(keys / "node.pub")]) == 0
    assert (bundle / "node.pub").read_text() == (keys / "node.pub").read_text() != old
    assert [p.read_text() for p in bundle.glob("node.pub.retired-*")] == [old]
    assert find_site_private_keys(pki) == []


# ---- fedpeft server refuses a PKI folder holding a site private key ---------------------------------------------

def _pem_private_key() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.mark.parametrize("plant", ["sites/a/node.key", "sites/a/audit.key", "sites/a/node.key.retired-20250101T0Z",
                                   "sites/a/agent-state/backup.txt", "removed/b-20250101T000000Z/old.pem"])
def test_any_site_private_key_in_the_pki_folder_is_found(tmp_path, pki, plant):
    keys = tmp_path / "site-keys"
    assert _keygen(keys) == 0 and _add_site(pki, "a", keys) == 0
    target = pki / plant
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_pem_private_key() if target.suffix != ".key" else (keys / "audit.key").read_bytes())
    assert find_site_private_keys(pki) == [target]
    with pytest.raises(DeployError, match=r"holds 1 site private key file") as info:
        check_no_site_private_keys(pki)
    assert str(target) in str(info.value) and "client keygen" in str(info.value)


def test_an_openssh_private_key_under_any_name_is_found(tmp_path, pki):
    assert _keygen(tmp_path / "k") == 0
    (pki / "sites" / "x").mkdir(parents=True)
    (pki / "sites" / "x" / "id").write_bytes((tmp_path / "k" / "node.key").read_bytes())
    assert find_site_private_keys(pki) == [pki / "sites" / "x" / "id"]


def test_server_refuses_to_start_before_anything_starts(tmp_path, pki, capsys):
    keys = tmp_path / "site-keys"
    assert _keygen(keys) == 0 and _add_site(pki, "a", keys) == 0
    leaked = pki / "sites" / "a" / "node.key"
    leaked.write_bytes((keys / "node.key").read_bytes())
    state = tmp_path / "coordinator"
    assert cli_main(["server", "--pki", str(pki), "--state-dir", str(state), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert str(leaked) in err and "will not start" in err and "delete the files listed here" in err
    assert not state.exists(), "nothing was started or written"
