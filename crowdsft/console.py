"""Terminal output helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@contextmanager
def progress_bar(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; yields the function that advances it."""
    if not enabled:
        yield lambda n: None
        return
    with click.progressbar(
        length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True
    ) as bar:
        yield bar.update


def quiet() -> bool:
    """Whether the command runs with ``crowdsft --quiet`` (outside a command: False)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("quiet"))


def note(line: str) -> None:
    """A status line for the person watching: on stderr, and not with --quiet."""
    if not quiet():
        click.echo(line, err=True)
