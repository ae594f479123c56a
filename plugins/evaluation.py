"""Evaluation functions: how close candidates are to the target, higher is better.

``l2``, ``l1`` and ``dot`` are the paper's; ``cosine`` is ours. Each maps a batch of
candidates ``(k, d)`` and a target ``(d,)`` to ``k`` scores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .hookspecs import Register, hookimpl


class Evaluation(ABC):
    """Score candidates against a target; higher is better."""

    @abstractmethod
    def __call__(self, candidates: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Scores of ``candidates`` (..., d) against ``target`` (d,): shape (...)."""


class L2(Evaluation):
    """Negative Euclidean distance: -||a - e||_2."""

    def __call__(self, candidates, target):
        diff = candidates - target
        return -np.sqrt(np.einsum("...d,...d->...", diff, diff))


class L1(Evaluation):
    """Negative Manhattan distance: -||a - e||_1."""

    def __call__(self, candidates, target):
        return -np.abs(candidates - target).sum(axis=-1)


class Dot(Evaluation):
    """Dot product a . e (higher is better, as in the paper)."""

    def __call__(self, candidates, target):
        return candidates @ target


class Cosine(Evaluation):
    """Cosine similarity between a and e (0 for a zero vector)."""

    def __call__(self, candidates, target):
        norms = np.linalg.norm(candidates, axis=-1) * np.linalg.norm(target)
        dots = candidates @ target
        return np.divide(dots, norms, out=np.zeros_like(dots, dtype=float), where=norms > 0)


@hookimpl
def crowdsft_register_evaluation(register: Register) -> None:
    register("l2", L2)
    register("l1", L1)
    register("dot", Dot)
    register("cosine", Cosine)
