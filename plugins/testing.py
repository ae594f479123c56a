"""Helpers for testing a plugin (shipped with the package: ``from crowdsft.plugins.testing
import ...``).

* ``make_outcome``: a ``RoundOutcome`` as the engine builds one, checked (every contributor in
  one group, one score per group, ``order`` a permutation of the groups or empty).
* ``registered``: a fresh plugin manager (built-ins only, no installed plugins) with your
  module or object registered, for the length of a ``with`` block.
* ``replay``: run a reward rule over outcomes the way the coordinator and ``node verify`` do
  (``reset``, then ``observe`` every round and ``update`` those that changed the model),
  from everyone at 1 point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .manager import Plugins, create_plugin_manager, lint_plugin
from .reward import Reward, RoundOutcome


def make_outcome(
    groups: Sequence[Sequence[int]],
    scores: Sequence[float],
    base_score: float = 0.0,
    order: Sequence[int] | None = None,
    weights: Sequence[Sequence[float]] | None = None,
    credits: Sequence[Sequence[float]] | None = None,
    round_index: int = 0,
) -> RoundOutcome:
    """A round's outcome: ``groups`` of contributor indices (together 0..n-1, each once),
    one score per group (higher is better), the current model's ``base_score``, ``order``
    (groups best first; default: by score; ``[]``: the guard kept the old model), members'
    influence ``weights`` (default 1 each) and in-run ``credits`` (default none)."""
    g = [np.asarray(m, dtype=np.int64) for m in groups]
    members = np.sort(np.concatenate(g)) if g else np.empty(0, dtype=np.int64)
    if not np.array_equal(members, np.arange(len(members))):
        raise ValueError("groups must hold every contributor 0..n-1 exactly once")
    s = np.asarray(scores, dtype=float)
    if s.shape != (len(g),):
        raise ValueError(f"need one score per group: {len(g)} groups, {s.size} scores")
    if order is None:
        o = np.argsort(-s, kind="stable")
    else:
        o = np.asarray(order, dtype=np.int64)
        if len(o) and sorted(o.tolist()) != list(range(len(g))):
            raise ValueError("order must list every group once, best first (or be empty)")
    w = [np.asarray(x, dtype=float) for x in weights] if weights is not None else None
    if w is None:
        w = [np.ones(len(m)) for m in g]
    if [len(x) for x in w] != [len(m) for m in g]:
        raise ValueError("weights must have one entry per member of each group")
    c = [np.asarray(x, dtype=float) for x in credits] if credits is not None else None
    if c is not None and [len(x) for x in c] != [len(m) for m in g]:
        raise ValueError("credits must have one entry per member of each group")
    return RoundOutcome(round_index, g, s, float(base_score), o, w, c)


@contextlib.contextmanager
def registered(plugin: object, name: str | None = None) -> Iterator[Plugins]:
    """A fresh ``Plugins`` (built-ins, no installed plugins) with ``plugin`` (a module or an
    object with ``@hookimpl`` methods) registered; fails where the plugin looks wrong (a
    misspelled hook, a hook without ``@hookimpl``, nothing registered)."""
    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    registered_name = plugins.register(plugin, name=name)
    problems = lint_plugin(plugins.pm, plugin, registered_name)
    if problems:
        plugins.unregister(registered_name)
        raise AssertionError(f"plugin {registered_name!r}: " + "; ".join(problems))
    try:
        yield plugins
    finally:
        plugins.unregister(registered_name)


def replay(reward: Reward, outcomes: Sequence[RoundOutcome], n: int) -> np.ndarray:
    """The points of ``n`` contributors after ``outcomes``, as the coordinator computes them:
    everyone starts at 1; ``reset(n)``; each round is observed, and rounds whose ``order``
    is not empty (the model changed) update the points."""
    reward.reset(n)
    points = np.ones(n)
    for outcome in outcomes:
        reward.observe(outcome)
        if len(outcome.order):
            points = np.asarray(reward.update(points, outcome), dtype=float)
            if points.shape != (n,):
                raise AssertionError(f"update returned shape {points.shape}, expected ({n},)")
    return points


__all__: list[Any] = ["make_outcome", "registered", "replay"]
