import stat

import pytest

from crowdsft.errors import KeyFileError
from crowdsft.keys import (
    Identity,
    load_private_key,
    node_id_from_public_key,
    write_private_key,
)


def test_generate_write_load_round_trip(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "keys" / "node.key"
    write_private_key(ident, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert loaded.public_key == ident.public_key
    assert loaded.node_id == ident.node_id == node_id_from_public_key(ident.public_key)
    assert len(ident.node_id) == 32


def test_encrypted_key_needs_the_passphrase(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "node.key"
    write_private_key(ident, path, passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert load_private_key(path, b"correct horse").public_key == ident.public_key
    with pytest.raises(KeyFileError, match="encrypted"):
        load_private_key(path)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(path, b"battery staple")


def test_never_overwrites_silently(tmp_path):
    path = tmp_path / "node.key"
    first = Identity.generate()
    write_private_key(first, path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_private_key(Identity.generate(), path)
    assert load_private_key(path).public_key == first.public_key
    second = Identity.generate()
    write_private_key(second, path, overwrite=True)
    assert load_private_key(path).public_key == second.public_key


def test_missing_and_foreign_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="no key file"):
        load_private_key(tmp_path / "absent.key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ec.key").write_bytes(other)
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        load_private_key(tmp_path / "ec.key")
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "junk.key")


def test_node_id_rejects_wrong_length():
    with pytest.raises(ValueError, match="32 bytes"):
        node_id_from_public_key(b"\x01" * 31)
