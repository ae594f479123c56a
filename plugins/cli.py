"""``crowdsft plugins ...``: what strategies are installed."""

from __future__ import annotations

import click

from crowdsft.console import echo_json


@click.group()
def plugins() -> None:
    """Inspect plugins and the strategies they register."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the strategies as JSON.")
def list_(as_json: bool) -> None:
    """Every registered strategy by kind, with the plugin it came from."""
    from crowdsft.plugins.manager import KINDS, get_plugins

    registry = get_plugins().registry()
    if as_json:
        echo_json(
            {
                kind: [
                    {"name": s.name, "plugin": s.plugin, "summary": s.summary}
                    for s in sorted(registry[kind].values(), key=lambda s: s.name)
                ]
                for kind in KINDS
            }
        )
        return
    for kind in KINDS:
        click.echo(f"{kind}:")
        for s in sorted(registry[kind].values(), key=lambda s: s.name):
            click.echo(f"  {s.name:16} {s.plugin:34} {s.summary}")
