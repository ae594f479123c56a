"""The plugin manager and a typed facade over its hooks.

Built-in strategies are loaded from ``BUILTINS``; third-party plugins from the entry-point
group ``crowdsft``. Nothing is loaded at import time: ``get_plugins()`` builds the manager on
first use.

Environment variables:

* ``CROWDSFT_DISABLE_PLUGINS``: comma-separated plugin names not to load (built-in module names
  such as ``crowdsft.plugins.reward``, or entry-point names).
* ``CROWDSFT_TRACE_PLUGINS=1``: log every hook call and its result (at DEBUG level).

A plugin that fails to import or register, or two plugins registering one strategy name, do
not stop the others: each is reported in one line (``Plugins.problems``, a logged warning,
and ``crowdsft plugins list``) naming the plugin, its package and file, and how to disable it.
Functions named like hooks that are not hooks, hooks without ``@hookimpl`` and plugins that
register nothing are warned about.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
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


class StrategyFailed(CrowdSFTError):
    """A strategy raised while the tournament called it: one line naming the strategy, its
    package and where it failed (the original exception is its ``__cause__``)."""


# The attribute through which a strategy built by ``Plugins.create`` knows its name (an
# instance attribute, so that it survives pickling to a worker process).
LABEL_ATTR = "_crowdsft_strategy"


def strategy_label(strategy: object, kind: str) -> str:
    """ "the reward strategy 'buggy-win' (package buggy 0.1)" for a strategy built by
    ``Plugins.create``; the class name for one built in code."""
    label = getattr(strategy, LABEL_ATTR, None)
    if isinstance(label, str):
        return label
    return f"the {kind} strategy {type(strategy).__name__}"


@contextlib.contextmanager
def blame(kind: str, strategy: object) -> Iterator[None]:
    """Turn an exception from inside ``strategy`` into a StrategyFailed naming it (errors
    that Crowd-SFT raises on purpose pass through unchanged)."""
    try:
        yield
    except CrowdSFTError:
        raise
    except Exception as exc:
        where = _where_in(exc, strategy)
        what = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise StrategyFailed(
            f"{strategy_label(strategy, kind)} failed: {what} (at {where})"
        ) from exc


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


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin comes from: its registered name, its package and version, and
    the file of its module."""

    name: str
    package: str
    version: str
    source: str


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed to load (``broken``), two plugins claiming one strategy name
    (``conflict``), or a plugin that loaded but looks wrong (``warning``)."""

    kind: str  # broken, conflict or warning
    plugin: str
    package: str
    where: str
    message: str

    def line(self) -> str:
        """One line naming the plugin, its package and file, and how to run without it."""
        what = {"broken": "failed to load", "conflict": "conflicts", "warning": "warning"}
        text = f"plugin {self.plugin!r} ({self.package}, {self.where}) {what[self.kind]}: "
        text += self.message
        if self.kind != "warning":
            text += f"; to run without it: {DISABLE_ENV}={self.plugin}"
        return text


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus where each plugin came from and what went wrong loading."""

    def __init__(self) -> None:
        super().__init__("crowdsft")
        self.info: dict[str, PluginInfo] = {}
        self.problems: list[PluginProblem] = []


def _where(exc: BaseException, fallback: str) -> str:
    """The file and line an import failure points at (the plugin's own code where it can)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    ours = [f for f in frames if "importlib" not in f.filename and "/pluggy/" not in f.filename]
    chosen = ours or frames
    return f"{chosen[-1].filename}:{chosen[-1].lineno}" if chosen else fallback


def _where_in(exc: BaseException, strategy: object) -> str:
    """The file and line of the last frame of ``exc`` in ``strategy``'s own module (the
    plugin's code, not the tournament that called it), else of its last frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    module = inspect.getmodule(type(strategy))
    own = getattr(module, "__file__", None)
    real = os.path.realpath(own) if own else None
    mine = [f for f in frames if real and os.path.realpath(f.filename) == real]
    chosen = mine or frames
    return f"{chosen[-1].filename}:{chosen[-1].lineno}" if chosen else "?"


def _source(plugin: object) -> str:
    module = plugin if inspect.ismodule(plugin) else inspect.getmodule(plugin)
    return str(getattr(module, "__file__", None) or getattr(module, "__name__", "?"))


HOOK_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("crowdsft_"))


def lint_plugin(pm: pluggy.PluginManager, plugin: object, name: str) -> list[str]:
    """What looks wrong in a registered plugin: functions named like hooks that are not
    (a misspelling), hooks without ``@hookimpl`` (ignored by pluggy), and nothing registered
    at all."""
    found = []
    marker = f"{pm.project_name}_impl"
    for attr in sorted(dir(plugin)):
        if not attr.startswith("crowdsft_"):
            continue
        value = getattr(plugin, attr, None)
        if not callable(value):
            continue
        if attr not in HOOK_NAMES:
            close = difflib.get_close_matches(attr, sorted(HOOK_NAMES), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            found.append(f"{attr} is not a Crowd-SFT hook{hint}: it is never called")
        elif getattr(value, marker, None) is None:
            found.append(f"{attr} has no @hookimpl: pluggy ignores it")
    if not pm.get_hookcallers(plugin):
        found.append("it implements no hook: it registers nothing")
    return found


def _option_names(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword options ``factory`` takes (None: any, or its signature is unknown)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def create_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """The built-in strategies and (``load_entry_points``) every installed plugin. A plugin
    that fails to import or to register is left out and recorded in ``pm.problems``, with
    a warning naming its package and file; the others load."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    blocked = _blocked()
    for name in blocked:
        pm.set_blocked(name)
    from crowdsft import __version__

    for module_name in BUILTINS:
        if module_name in blocked:
            continue
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        pm.info[module_name] = PluginInfo(module_name, "crowd-sft", __version__, _source(module))
    if load_entry_points:
        _load_entry_points(pm)
    for problem in pm.problems:
        logger.warning("%s", problem.line())
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: logger.debug("hook: %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


def _load_entry_points(pm: PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        package = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown package"
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as exc:  # a plugin that exits at import is broken too
            where = _where(exc, ep.value)
            if isinstance(exc, SystemExit):
                message = f"SystemExit({exc.code!r}) while importing: a plugin must not exit"
            else:
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            pm.problems.append(PluginProblem("broken", ep.name, package, where, message))
            continue
        try:
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # pluggy's PluginValidationError: a hook's bad signature
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            where = _source(plugin)
            pm.problems.append(PluginProblem("broken", ep.name, package, where, message))
            continue
        dist_name = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "?"
        pm.info[ep.name] = PluginInfo(ep.name, dist_name, version, _source(plugin))
        for message in lint_plugin(pm, plugin, ep.name):
            pm.problems.append(PluginProblem("warning", ep.name, package, _source(plugin), message))


def _culprit(owners: list[str]) -> str:
    """Of plugins claiming one name, the one to suggest disabling: a third-party one."""
    return next((o for o in owners if o not in BUILTINS), owners[-1])


class Plugins:
    """Typed access to the hooks: what core code calls instead of ``pm.hook``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._registry: dict[str, dict[str, Strategy]] | None = None
        # (kind, name) -> the plugins that all registered it: none of them gets the name
        self._conflicts: dict[tuple[str, str], list[str]] = {}
        self._failed: list[PluginProblem] = []

    def registry(self) -> dict[str, dict[str, Strategy]]:
        if self._registry is None:
            self._conflicts, self._failed = {}, []
            self._registry = {kind: self._collect(kind) for kind in KINDS}
            for problem in self._registry_problems():
                logger.warning("%s", problem.line())
        return self._registry

    def invalidate(self) -> None:
        """Forget the registry (after registering or unregistering a plugin)."""
        self._registry = None

    def info(self, plugin: str) -> PluginInfo | None:
        """Package, version and file of a loaded plugin (None: registered in code)."""
        return getattr(self.pm, "info", {}).get(plugin)

    @property
    def problems(self) -> list[PluginProblem]:
        """Plugins that failed to load, conflicting names, and warnings, one each."""
        self.registry()
        return list(getattr(self.pm, "problems", [])) + self._registry_problems()

    def _registry_problems(self) -> list[PluginProblem]:
        out = list(self._failed)
        for (kind, name), owners in sorted(self._conflicts.items()):
            culprit = _culprit(owners)
            info = self.info(culprit)
            out.append(
                PluginProblem(
                    "conflict",
                    culprit,
                    f"{info.package} {info.version}" if info else "registered in code",
                    info.source if info else "?",
                    f"{kind} strategy {name!r} is registered by both "
                    f"{' and '.join(owners)}; neither is used",
                )
            )
        return out

    def _collect(self, kind: str) -> dict[str, Strategy]:
        found: dict[str, Strategy] = {}
        claimed: dict[str, list[str]] = {}
        hook_name = f"crowdsft_register_{kind}"
        hook = getattr(self.pm.hook, hook_name)
        everyone = self.pm.get_plugins()
        for impl in reversed(hook.get_hookimpls()):

            def register(name: str, factory: Callable[..., Any], _plugin: str = impl.plugin_name):
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin} registered a {kind} with no name")
                claimed.setdefault(name, []).append(_plugin)
                found.setdefault(name, Strategy(kind, name, factory, _plugin))

            # One plugin at a time (so each strategy is credited to its plugin), through the
            # hook machinery (so tracing and monitoring see the call).
            others = [p for p in everyone if p is not impl.plugin]
            try:
                self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
            except Exception as exc:
                info = self.info(impl.plugin_name)
                self._failed.append(
                    PluginProblem(
                        "broken",
                        impl.plugin_name,
                        f"{info.package} {info.version}" if info else "registered in code",
                        _where(exc, info.source if info else "?"),
                        f"its {hook_name} raised {type(exc).__name__}: {exc}".splitlines()[0],
                    )
                )
        for name, owners in claimed.items():
            if len(owners) > 1:
                self._conflicts[(kind, name)] = owners
                del found[name]
        return found

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry()[kind])

    def package_of(self, kind: str, name: str) -> str | None:
        """The distribution and version ("name 1.2") that provides strategy ``name`` of
        ``kind``, for a strategy from an installed plugin package; None for crowd-sft's own
        strategies and ones registered in code."""
        strategy = self.registry()[kind].get(name)
        if strategy is None:
            return None
        info = self.info(strategy.plugin)
        return f"{info.package} {info.version}" if info else None

    def get(self, kind: str, name: str) -> Strategy:
        if kind not in KINDS:
            raise PluginError(f"unknown strategy kind {kind!r} (kinds: {', '.join(KINDS)})")
        strategies = self.registry()[kind]
        owners = self._conflicts.get((kind, name))
        if owners:
            raise PluginError(
                f"{kind} strategy {name!r} is registered by both {' and '.join(owners)}: "
                f"disable one with {DISABLE_ENV}={_culprit(owners)}"
            )
        if name not in strategies:
            known = ", ".join(sorted(strategies)) or "none"
            raise PluginError(f"no {kind} strategy named {name!r} (registered: {known})")
        return strategies[name]

    def create(self, kind: str, name: str, **options: Any) -> Any:
        """Build the strategy ``name`` of ``kind`` with its options."""
        strategy = self.get(kind, name)
        accepted = _option_names(strategy.factory)
        unknown = sorted(set(options) - accepted) if accepted is not None else []
        if unknown:
            valid = ", ".join(sorted(accepted or ())) or "none"
            raise PluginError(
                f"{kind} strategy {name!r} has no option {', '.join(map(repr, unknown))} "
                f"(its options: {valid})"
            )
        try:
            built = strategy.factory(**options)
        except TypeError as exc:
            raise PluginError(f"cannot build {kind} strategy {name!r}: {exc}") from None
        package = self.package_of(kind, name)
        label = f"the {kind} strategy {name!r}" + (f" (package {package})" if package else "")
        with contextlib.suppress(AttributeError, TypeError):  # __slots__ or frozen: no label
            object.__setattr__(built, LABEL_ATTR, label)
        return built

    def validate_contribution(self, node_id: str, examples: Sequence[dict[str, Any]]) -> list[str]:
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
