"""Creating a coordinator folder."""

from __future__ import annotations

from pathlib import Path

from crowdsft.errors import ConfigError


def init_coordinator(directory: Path, *, listen: str | None = None, force: bool = False) -> Path:
    """Create a coordinator folder: key (0600), commented config, data folder. Returns the
    config path. Refuses to touch an existing key or config unless ``force``."""
    from crowdsft.config import DEFAULT_COORDINATOR_TOML, load_coordinator_config
    from crowdsft.node.keys import Identity, write_private_key

    directory = directory.resolve()
    config_path = directory / "coordinator.toml"
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} already exists; refusing to overwrite it (use --force)")
    directory.mkdir(parents=True, exist_ok=True)
    text = DEFAULT_COORDINATOR_TOML
    if listen:
        text = text.replace('listen = "127.0.0.1:50051"', f'listen = "{listen}"', 1)
    key_path = directory / "coordinator.key"
    if not key_path.exists():
        write_private_key(Identity.generate(), key_path)
    elif not force:
        raise ConfigError(f"{key_path} already exists; refusing to overwrite it (use --force)")
    config_path.write_text(text)
    config = load_coordinator_config(config_path)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return config_path
