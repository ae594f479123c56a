"""Ed25519 identities: generation, PKCS8 PEM files (optionally encrypted), node ids.

A node id is derived from the public key (the first 16 bytes of its SHA-256, in hex), so it can
be checked by anyone who sees the key and never needs to be assigned.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Ed25519 verification (RFC 8032, with libsodium's strict checks: canonical signatures,
    no small-order keys). libsodium releases the GIL and is about twice as fast as OpenSSL
    here, which matters on the coordinator's ingest path."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.bindings.crypto_sign_open(signature + data, public_key)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A private key with its raw public key and id. Key files are handled with
    ``cryptography`` (PKCS8, encryption); signing uses libsodium with the same key."""

    private_key: Ed25519PrivateKey
    public_key: bytes = field(init=False, repr=False)
    _secret: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        seed = self.private_key.private_bytes_raw()
        public, secret = nacl.bindings.crypto_sign_seed_keypair(seed)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "_secret", secret)

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return nacl.bindings.crypto_sign(data, self._secret)[:SIGNATURE_BYTES]

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
