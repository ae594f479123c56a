"""TLS material for coordinators that have no PKI of their own: a self-signed server
certificate, and a small CA that issues client certificates for mutual TLS.

Keys are ECDSA P-256 (what every TLS stack, BoringSSL in gRPC included, speaks), written
mode 0600; certificates are PEM. A node trusts a self-signed coordinator by passing its
certificate with ``--tls-ca``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crowdsft import atomic
from crowdsft.errors import ConfigError

DEFAULT_DAYS = 825


def default_names() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; refusing to overwrite it")
    atomic.write_bytes(path, data, mode)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    names: Iterable[str] = (),
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    days: int = DEFAULT_DAYS,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = issuer if issuer else (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    names = list(names)
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER bytes, hex with colons (what ``openssl x509
    -fingerprint -sha256`` prints), for telling nodes out of band."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def self_signed_server(
    cert_path: Path,
    key_path: Path,
    names: Iterable[str] | None = None,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> bytes:
    """Write a self-signed server certificate valid for ``names`` (host names and IP
    addresses) and its key; return the certificate PEM."""
    names = list(names or default_names())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(
        names[0], key, None, names=names, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=days
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(key_path, _key_pem(key), 0o600, force)
    _write(cert_path, pem, 0o644, force)
    return pem


def new_ca(cert_path: Path, key_path: Path, name: str, *, force: bool = False) -> bytes:
    """Write a CA (certificate and key) for issuing client certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, None, ca=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(key_path, _key_pem(key), 0o600, force)
    _write(cert_path, pem, 0o644, force)
    return pem


def issue_client(
    ca_cert_path: Path,
    ca_key_path: Path,
    cert_path: Path,
    key_path: Path,
    name: str,
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> bytes:
    """Issue a client certificate for mutual TLS, signed by the CA."""
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the client CA ({ca_cert_path}, {ca_key_path}): {exc}"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key_path} is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(
        name,
        key,
        (ca_cert.subject, ca_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(key_path, _key_pem(key), 0o600, force)
    _write(cert_path, pem, 0o644, force)
    return pem
