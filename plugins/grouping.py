"""Grouping strategies: how contributors are split into ``G`` groups each round.

Exactly as the paper's experiments do it (PAPER.md): ``random``, ``epsilon-greedy`` and
``interleaved``. A strategy returns a list of ``G`` index arrays that together hold every
contributor exactly once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .hookspecs import Register, hookimpl


class Grouping(ABC):
    """Split contributors into groups."""

    def __init__(self, groups: int) -> None:
        if groups < 1:
            raise ValueError("groups must be at least 1")
        self.groups = groups

    @abstractmethod
    def group(
        self, points: np.ndarray, round_index: int, rounds: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """Index arrays, one per group, for contributors with ``points`` at round
        ``round_index`` (from 0) of ``rounds``."""

    def _check(self, n: int) -> None:
        if n < self.groups:
            raise ValueError(f"cannot split {n} contributors into {self.groups} groups")


class RandomGrouping(Grouping):
    """A random permutation split into nearly equal groups."""

    def group(self, points, round_index, rounds, rng):
        self._check(len(points))
        return np.array_split(rng.permutation(len(points)), self.groups)


class EpsilonGreedyGrouping(Grouping):
    """With probability max(floor, 1 - round/rounds) random; else tiers sorted by points.

    ``jitter`` > 0 sorts the tiers by the points plus Gaussian noise of ``jitter`` times the
    points' standard deviation: contributors of similar points still share a tier, but not
    always the same tier-mates, so a reward that explains group scores by their members
    (``regression``) can tell tier-mates apart. 0 (the default) is the paper's rule."""

    def __init__(self, groups: int, floor: float = 0.4, jitter: float = 0.0) -> None:
        super().__init__(groups)
        if not 0.0 <= floor <= 1.0:
            raise ValueError("floor must lie in [0, 1]")
        if jitter < 0:
            raise ValueError("jitter must be >= 0")
        self.floor = floor
        self.jitter = jitter

    def epsilon(self, round_index: int, rounds: int) -> float:
        return max(self.floor, 1.0 - round_index / max(rounds, 1))

    def group(self, points, round_index, rounds, rng):
        self._check(len(points))
        if rng.random() < self.epsilon(round_index, rounds):
            return np.array_split(rng.permutation(len(points)), self.groups)
        key = np.asarray(points, dtype=float)
        if self.jitter > 0:
            key = key + rng.normal(0.0, self.jitter * (key.std() or 1.0), len(key))
        return np.array_split(np.argsort(key, kind="stable"), self.groups)


class InterleavedGrouping(Grouping):
    """Bottom and top halves by points, each shuffled and dealt round-robin into the groups."""

    def group(self, points, round_index, rounds, rng):
        n = len(points)
        self._check(n)
        order = np.argsort(points, kind="stable")
        half = n // 2
        bottom, top = rng.permutation(order[:half]), rng.permutation(order[half:])
        dealt = np.concatenate([bottom, top])
        slots = np.arange(n) % self.groups
        return [dealt[slots == g] for g in range(self.groups)]


@hookimpl
def crowdsft_register_grouping(register: Register) -> None:
    register("random", RandomGrouping)
    register("epsilon-greedy", EpsilonGreedyGrouping)
    register("interleaved", InterleavedGrouping)
