"""Influence rules: each member's weight inside its group's candidate, from its points."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .hookspecs import Register, hookimpl


class Influence(ABC):
    @abstractmethod
    def weights(self, points: np.ndarray) -> np.ndarray:
        """Non-negative weights for members with ``points`` (need not sum to 1)."""


class PointsSquared(Influence):
    """Weight p² (the paper's rule)."""

    def weights(self, points):
        return np.square(points)


class Uniform(Influence):
    """Every member weighs the same."""

    def weights(self, points):
        return np.ones_like(points, dtype=float)


@hookimpl
def crowdsft_register_influence(register: Register) -> None:
    register("points-squared", PointsSquared)
    register("uniform", Uniform)
