"""TLS and mutual TLS: a coordinator created with ``init --tls`` / ``--mtls`` serves only
nodes that verify its certificate (and, with mutual TLS, present their own)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.config import load_coordinator_config
from crowdsft.coordinator.server.app import Coordinator
from crowdsft.errors import ConfigError, CoordinatorError
from crowdsft.node.client import Backoff, CoordinatorClient, TLSClient
from crowdsft.tls import self_signed_server

ONCE = Backoff(attempts=1)


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def serve(tmp_path, *flags: str) -> tuple[Coordinator, object]:
    cli("coordinator", "init", str(tmp_path / "c"), "--listen", "127.0.0.1:0", *flags)
    config = load_coordinator_config(tmp_path / "c" / "coordinator.toml")
    return Coordinator(config).start(), config


def test_init_tls_writes_a_pair_and_the_config(tmp_path):
    out = cli("coordinator", "init", str(tmp_path / "c"), "--tls", "--tls-name", "crowd.example")
    assert "SHA-256:" in out.output
    config = load_coordinator_config(tmp_path / "c" / "coordinator.toml")
    key = config.resolve(config.server.tls_key_file)
    assert key.stat().st_mode & 0o777 == 0o600
    assert config.resolve(config.server.tls_cert_file).read_bytes().startswith(b"-----BEGIN")


def test_nodes_verify_the_server_certificate(tmp_path):
    coord, config = serve(tmp_path, "--tls")
    cert = config.resolve(config.server.tls_cert_file)
    try:
        with CoordinatorClient(coord.address, tls=TLSClient.from_files(ca=cert)) as c:
            assert c.info().public_key == coord.identity.public_key
        with (
            CoordinatorClient(coord.address, backoff=ONCE, timeout=3) as c,
            pytest.raises(CoordinatorError, match=r"UNAVAILABLE.*If it serves TLS, pass --tls-ca"),
        ):
            c.info()  # plaintext to a TLS port
        other = tmp_path / "other.crt"
        self_signed_server(other, tmp_path / "other.key", ["localhost", "127.0.0.1"])
        with (
            CoordinatorClient(
                coord.address, backoff=ONCE, timeout=3, tls=TLSClient.from_files(ca=other)
            ) as c,
            pytest.raises(CoordinatorError, match=r"UNAVAILABLE.*--tls-ca trusts"),
        ):
            c.info()  # a certificate this node does not trust
        key = tmp_path / "n.key"
        cli("node", "keygen", "--out", str(key))
        status = cli(
            "node",
            "status",
            "--coordinator",
            coord.address,
            "--key",
            str(key),
            "--tls-ca",
            str(cert),
            "--json",
        )
        assert json.loads(status.output)["registered"] is False
    finally:
        coord.stop(0)


def test_mutual_tls_wants_a_client_certificate(tmp_path):
    coord, config = serve(tmp_path, "--mtls")
    cert = config.resolve(config.server.tls_cert_file)
    try:
        with (
            CoordinatorClient(
                coord.address, backoff=ONCE, timeout=3, tls=TLSClient.from_files(ca=cert)
            ) as c,
            pytest.raises(CoordinatorError),
        ):
            c.info()
        cli(
            "coordinator",
            "client-cert",
            "--config",
            str(config.path),
            "--name",
            "alice",
            "--out",
            str(tmp_path / "certs"),
        )
        tls = TLSClient.from_files(
            ca=cert, cert=tmp_path / "certs" / "alice.crt", key=tmp_path / "certs" / "alice.key"
        )
        with CoordinatorClient(coord.address, tls=tls) as c:
            assert c.info().public_key == coord.identity.public_key
    finally:
        coord.stop(0)


def test_half_a_tls_config_is_an_error(tmp_path):
    cli("coordinator", "init", str(tmp_path / "c"))
    path = tmp_path / "c" / "coordinator.toml"
    path.write_text(
        path.read_text().replace('# tls_cert_file = "tls/server.crt"', 'tls_cert_file = "x.crt"')
    )
    with pytest.raises(ConfigError, match="go together"):
        load_coordinator_config(path)
    with pytest.raises(ConfigError, match="needs its key"):
        TLSClient.from_files(cert=path)
