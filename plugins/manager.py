"""The plugin manager and a typed facade over its hooks.

Built-in strategies are loaded from ``BUILTINS``; third-party plugins from the entry-point
group ``crowdsft``. Nothing is loaded at import time: ``get_plugins()`` builds the manager on
first use.

Environment variables:

* ``CROWDSFT_DISABLE_PLUGINS``: comma-separated plugin names not to load (built-in module names
  such as ``crowdsft.plugins.reward``, or entry-point names).
* ``CROWDSFT_TRACE_PLUGINS=1``: log every hook call and its result (at DEBUG level).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from crowdsft.errors import CrowdSFTError

from . import hookspecs

if TYPE_CHECKING:
    from crowdsft.tournament import RoundRecord

logger = logging.getLogger(__name__)

BUILTINS: tuple[str, ...] = (
    "crowdsft.plugins.grouping",
    "crowdsft.plugins.evaluation",
    "crowdsft.plugins.selection",
    "crowdsft.plugins.reward",
    "crowdsft.plugins.influence",
    "crowdsft.plugins.valuation",
    "crowdsft.plugins.embedding",
    "crowdsft.plugins.goemotions",
    "crowdsft.plugins.admission",
)
KINDS: tuple[str, ...] = (
    "grouping",
    "evaluation",
    "selection",
    "reward",
    "influence",
    "valuation",
    "embedder",
    "admission",
)
ENTRY_POINT_GROUP = "crowdsft"
DISABLE_ENV = "CROWDSFT_DISABLE_PLUGINS"
TRACE_ENV = "CROWDSFT_TRACE_PLUGINS"


class PluginError(CrowdSFTError):
    """A strategy name is unknown or registered twice, or a plugin misbehaves."""

    exit_code = 2


@dataclass(frozen=True)
class Strategy:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str

    @property
    def summary(self) -> str:
        doc = (self.factory.__doc__ or "").strip()
        first = " ".join(doc.split("\n\n")[0].split())
        if len(first) > 90 and ". " in first:
            first = first.split(". ")[0] + "."
        return first


def _blocked() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def create_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("crowdsft")
    pm.add_hookspecs(hookspecs)
    blocked = _blocked()
    for name in blocked:
        pm.set_blocked(name)
    for module_name in BUILTINS:
        if module_name in blocked:
            continue
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: logger.debug("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


class Plugins:
    """Typed access to the hooks: what core code calls instead of ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._registry: dict[str, dict[str, Strategy]] | None = None

    def registry(self) -> dict[str, dict[str, Strategy]]:
        if self._registry is None:
            self._registry = {kind: self._collect(kind) for kind in KINDS}
        return self._registry

    def invalidate(self) -> None:
        """Forget the registry (after registering or unregistering a plugin)."""
        self._registry = None

    def _collect(self, kind: str) -> dict[str, Strategy]:
        found: dict[str, Strategy] = {}
        hook_name = f"crowdsft_register_{kind}"
        hook = getattr(self.pm.hook, hook_name)
        everyone = self.pm.get_plugins()
        for impl in reversed(hook.get_hookimpls()):

            def register(name: str, factory: Callable[..., Any], _plugin: str = impl.plugin_name):
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin} registered a {kind} with no name")
                if name in found:
                    raise PluginError(
                        f"{kind} strategy {name!r} is registered by both "
                        f"{found[name].plugin} and {_plugin}"
                    )
                found[name] = Strategy(kind, name, factory, _plugin)

            # One plugin at a time (so each strategy is credited to its plugin), through the
            # hook machinery (so tracing and monitoring see the call).
            others = [p for p in everyone if p is not impl.plugin]
            self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry()[kind])

    def get(self, kind: str, name: str) -> Strategy:
        if kind not in KINDS:
            raise PluginError(f"unknown strategy kind {kind!r} (kinds: {', '.join(KINDS)})")
        strategies = self.registry()[kind]
        if name not in strategies:
            known = ", ".join(sorted(strategies)) or "none"
            raise PluginError(f"no {kind} strategy named {name!r} (registered: {known})")
        return strategies[name]

    def create(self, kind: str, name: str, **options: Any) -> Any:
        """Build the strategy ``name`` of ``kind`` with its options."""
        strategy = self.get(kind, name)
        try:
            return strategy.factory(**options)
        except TypeError as exc:
            raise PluginError(f"cannot build {kind} strategy {name!r}: {exc}") from None

    def validate_contribution(self, node_id: str, examples: Sequence[dict[str, str]]) -> list[str]:
        """Every plugin's rejection reason for a contribution (empty: accept)."""
        reasons = self.pm.hook.crowdsft_validate_contribution(node_id=node_id, examples=examples)
        return [r for r in reasons if r]

    def round_finished(self, record: RoundRecord) -> None:
        self.pm.hook.crowdsft_round_finished(record=record)

    def register(self, plugin: object, name: str | None = None) -> str:
        registered = self.pm.register(plugin, name=name)
        self.invalidate()
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked")
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.invalidate()


@functools.cache
def get_plugins() -> Plugins:
    """The process-wide plugins, loaded on first use."""
    return Plugins(create_plugin_manager())
