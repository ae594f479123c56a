"""Selection: the improvement guard, the winner, and the simulated judging error."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .hookspecs import Register, hookimpl


@dataclass(frozen=True)
class Ranking:
    """Groups ordered best first (after any judging error); ``swapped`` says an error struck."""

    order: np.ndarray
    swapped: bool = False

    @property
    def winner(self) -> int:
        return int(self.order[0])


class Selection(ABC):
    """Rank the candidates of a round, or decline to update (return None)."""

    @abstractmethod
    def select(
        self, scores: np.ndarray, base_score: float, rng: np.random.Generator
    ) -> Ranking | None: ...


class BestWithGuard(Selection):
    """Best candidate wins if it beats the current model; with probability ``error`` the top
    group swaps places with a uniformly chosen lower-ranked one (the paper's judging error)."""

    def __init__(self, error: float = 0.05, guard: bool = True) -> None:
        if not 0.0 <= error <= 1.0:
            raise ValueError("error must lie in [0, 1]")
        self.error = error
        self.guard = guard

    def select(self, scores, base_score, rng):
        if self.guard and not np.any(scores > base_score):
            return None
        order = np.argsort(-np.asarray(scores), kind="stable")
        swapped = False
        if len(order) > 1 and self.error > 0 and rng.random() < self.error:
            j = int(rng.integers(1, len(order)))
            order[0], order[j] = order[j], order[0]
            swapped = True
        return Ranking(order, swapped)


@hookimpl
def crowdsft_register_selection(register: Register) -> None:
    register("best", BestWithGuard)
