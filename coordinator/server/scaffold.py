"""Creating a coordinator folder."""

from __future__ import annotations

import json
from pathlib import Path

from crowdsft.errors import ConfigError

TLS_CERT = "tls/server.crt"
TLS_KEY = "tls/server.key"
CLIENT_CA = "tls/clients-ca.crt"
CLIENT_CA_KEY = "tls/clients-ca.key"


def init_coordinator(
    directory: Path,
    *,
    listen: str | None = None,
    force: bool = False,
    tls: bool = False,
    tls_names: tuple[str, ...] = (),
    mtls: bool = False,
) -> Path:
    """Create a coordinator folder: key (0600), commented config, data folder; with ``tls``
    a self-signed server certificate for ``tls_names`` (default: localhost, loopback and this
    host's name); with ``mtls`` also a CA for client certificates. Returns the config path.
    Refuses to touch an existing key or config unless ``force``."""
    from crowdsft.config import load_coordinator_config, render_template
    from crowdsft.keys import Identity, write_private_key

    directory = directory.resolve()
    config_path = directory / "coordinator.toml"
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} already exists; refusing to overwrite it (use --force)")
    directory.mkdir(parents=True, exist_ok=True)
    server: dict[str, str] = {"listen": listen} if listen else {}
    if tls or mtls:
        from crowdsft import tls as tlslib

        names = list(tls_names) or tlslib.default_names()
        tlslib.self_signed_server(directory / TLS_CERT, directory / TLS_KEY, names, force=force)
        server |= {"tls_cert_file": TLS_CERT, "tls_key_file": TLS_KEY}
        if mtls:
            tlslib.new_ca(
                directory / CLIENT_CA, directory / CLIENT_CA_KEY, "crowdsft node CA", force=force
            )
            server["tls_client_ca_file"] = CLIENT_CA
    text = render_template({"server": server})
    key_path = directory / "coordinator.key"
    if not key_path.exists():
        write_private_key(Identity.generate(), key_path)
    elif not force:
        raise ConfigError(f"{key_path} already exists; refusing to overwrite it (use --force)")
    config_path.write_text(text)
    config = load_coordinator_config(config_path)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return config_path


# `coordinator init` writes this beside the config as target.example.jsonl: the shape of a
# target file (evaluation prompts, each with the expert's response; "system" optional).
EXAMPLE_TARGETS = [
    {
        "prompt": "In one sentence, why does the sky look blue?",
        "response": "Air molecules scatter short blue wavelengths of sunlight far more than red "
        "ones, so blue light reaches us from every direction.",
    },
    {
        "prompt": "What should I do if a pan of oil catches fire?",
        "response": "Turn off the heat and cover the pan with a lid or damp towel; never pour "
        "water on it.",
    },
    {
        "prompt": "Summarise the rule of thumb for a good password.",
        "response": "Use a long, unique passphrase for every account and keep them in a "
        "password manager.",
        "system": "Answer in one sentence.",
    },
]
EXAMPLE_TARGET = "".join(json.dumps(t) + "\n" for t in EXAMPLE_TARGETS)
