"""Ed25519 identities: generation, PKCS8 PEM files (optionally encrypted), node ids.

A node id is derived from the public key (the first 16 bytes of its SHA-256, in hex), so it can
be checked by anyone who sees the key and never needs to be assigned.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crowdsft.errors import KeyFileError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
DEFAULT_PASSPHRASE_ENV = "CROWDSFT_KEY_PASSPHRASE"


def node_id_from_public_key(public_key: bytes) -> str:
    """The node id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
        )
    return hashlib.sha256(public_key).hexdigest()[:32]


@dataclass(frozen=True)
class Identity:
    """A private key with its raw public key and id."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption
        if passphrase:
            encryption = serialization.BestAvailableEncryption(passphrase)
        else:
            encryption = serialization.NoEncryption()
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def write_private_key(
    identity: Identity, path: Path, passphrase: bytes | None = None, overwrite: bool = False
) -> None:
    """Write ``identity`` as PKCS8 PEM with file mode 0600, atomically.

    Refuses to replace an existing file unless ``overwrite`` is set: a lost key is a lost
    identity, with all of its receipts and points.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = identity.to_pem(passphrase)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_private_key(path: Path, passphrase: bytes | None = None) -> Identity:
    """Load an Ed25519 private key from a PKCS8 PEM file, decrypting it with ``passphrase``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {path} (create one with: crowdsft node keygen)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and not passphrase:
        raise KeyFileError(
            f"{path} is encrypted; set the passphrase in ${DEFAULT_PASSPHRASE_ENV} "
            "(or the variable named by --passphrase-env)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        reason = "wrong passphrase or corrupt file" if encrypted else str(exc)
        raise KeyFileError(f"cannot load key from {path}: {reason}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return Identity(key)


def passphrase_from_env(name: str = DEFAULT_PASSPHRASE_ENV) -> bytes | None:
    """The passphrase in environment variable ``name``, or None where it is unset or empty."""
    value = os.environ.get(name)
    return value.encode() if value else None


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    """A public key object from 32 raw bytes; ValueError on any other length."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key has {len(raw)} bytes; an Ed25519 key has {PUBLIC_KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)
