"""Who trains a round's candidates: the round runner hands its executor the candidates still
to train (same base, each group's members and influence weights, each with its own seeded
random stream) and stores each adapter as it arrives, one commit per candidate.

``LocalExecutor`` (the default) trains them one after another in this process, through the
model space. ``coordinator.training.distributed.RayExecutor`` trains them as Ray tasks,
in parallel, on any machine of a Ray cluster (``[training] executor = "ray"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .space import Candidate, RoundSpace


@dataclass(frozen=True)
class CandidateJob:
    """One candidate to train: its group's index, members (contributor indices of the
    space's data) and their influence weights, and the random stream its training seed is
    drawn from."""

    group: int
    members: np.ndarray
    weights: np.ndarray
    rng: np.random.Generator


Started = Callable[[CandidateJob], None]


class TrainingExecutor(Protocol):
    """Trains candidates from ``base``; calls ``started(job)`` as each job starts (or is
    submitted), and yields ``(group, adapter digest)`` as each adapter is stored in the
    space's adapter folder, with ``space.training_info(digest)`` known. The order of arrival
    may differ from the order of ``jobs``. Closing the generator early (the runner stopping)
    abandons the jobs not yet received."""

    def train(
        self,
        space: RoundSpace,
        base: Candidate,
        jobs: Sequence[CandidateJob],
        started: Started = lambda job: None,
    ) -> Iterator[tuple[int, str]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Today's behaviour: each candidate in turn, in this process, through ``space.propose``."""

    def train(
        self,
        space: RoundSpace,
        base: Candidate,
        jobs: Sequence[CandidateJob],
        started: Started = lambda job: None,
    ) -> Iterator[tuple[int, str]]:
        for job in jobs:
            started(job)
            cand = space.propose(base, job.members, job.weights, job.rng)
            assert cand.adapter is not None
            yield job.group, cand.adapter

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"executor": "local"}
