"""The round engine: pure, seeded logic over a model space.

One round::

    base -> group contributors -> one candidate per group -> score candidates and base
         -> select a winner (improvement guard, judging error) -> award points
         -> record the round -> the winner is the next base

The engine knows nothing about vectors or LLMs: a ``ModelSpace`` proposes a candidate for a
group and scores candidates against its target. The vector space of the paper's simulation
(``VectorSpace``) is the first; the LLM space reuses this engine unchanged. All randomness
comes from the ``numpy.random.Generator`` passed in, so a seed fixes a whole tournament.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from crowdsft.plugins.evaluation import Evaluation
from crowdsft.plugins.grouping import Grouping
from crowdsft.plugins.influence import Influence
from crowdsft.plugins.reward import Reward, RoundOutcome
from crowdsft.plugins.selection import Selection


class ModelSpace(Protocol):
    """Where candidates live."""

    n_contributors: int

    def propose(
        self,
        base: Any,
        members: np.ndarray,
        weights: np.ndarray,
        rng: np.random.Generator,
    ) -> Any:
        """A candidate trained from ``base`` on the data of ``members`` (their influence
        ``weights`` given)."""
        ...

    def score(self, models: Sequence[Any]) -> np.ndarray:
        """Scores of ``models`` against the target; higher is better."""
        ...


@dataclass(frozen=True)
class Strategies:
    grouping: Grouping
    selection: Selection
    reward: Reward
    influence: Influence


@dataclass
class TournamentState:
    base: Any
    base_score: float
    points: np.ndarray
    round_index: int = 0


@dataclass(frozen=True)
class RoundRecord:
    """Everything a round decided."""

    round_index: int
    groups: list[np.ndarray]
    scores: np.ndarray  # candidate scores, one per group
    base_score: float  # the model's score before the round
    updated: bool  # False when the improvement guard kept the old model
    order: np.ndarray | None  # groups best first after any judging error; None if not updated
    swapped: bool  # a judging error struck
    points_before: np.ndarray
    points_after: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def winner(self) -> int | None:
        return int(self.order[0]) if self.order is not None else None

    @property
    def winner_score(self) -> float:
        return float(self.scores[self.winner]) if self.order is not None else self.base_score


class RoundEngine:
    """Runs rounds of a tournament over ``space`` with ``strategies``."""

    def __init__(
        self,
        space: ModelSpace | None,
        strategies: Strategies,
        rounds: int,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.space = space
        self.strategies = strategies
        self.rounds = rounds
        self.on_round = on_round

    def start(self, base: Any, initial_points: float = 1.0) -> TournamentState:
        if self.space is None:
            raise ValueError("this engine has no model space; it can only plan and decide")
        self.strategies.reward.reset(self.space.n_contributors)
        score = float(self.space.score([base])[0])
        points = np.full(self.space.n_contributors, float(initial_points))
        return TournamentState(base=base, base_score=score, points=points)

    def plan(
        self, state: TournamentState, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Groups for this round and each member's influence weight."""
        s = self.strategies
        groups = s.grouping.group(state.points, state.round_index, self.rounds, rng)
        weights = [s.influence.weights(state.points[g]) for g in groups]
        return groups, weights

    def decide(
        self,
        state: TournamentState,
        groups: list[np.ndarray],
        weights: list[np.ndarray],
        candidates: Sequence[Any],
        scores: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[TournamentState, RoundRecord]:
        """Selection (guard, judging error) and reward, given the scored candidates."""
        s = self.strategies
        scores = np.asarray(scores, dtype=float)
        ranking = s.selection.select(scores, state.base_score, rng)
        order = ranking.order if ranking is not None else np.empty(0, dtype=np.int64)
        s.reward.observe(
            RoundOutcome(state.round_index, groups, scores, state.base_score, order, weights)
        )
        if ranking is None:
            record = RoundRecord(
                state.round_index,
                groups,
                scores,
                state.base_score,
                False,
                None,
                False,
                state.points,
                state.points,
            )
            new_state = TournamentState(
                state.base, state.base_score, state.points, state.round_index + 1
            )
        else:
            outcome = RoundOutcome(
                state.round_index, groups, scores, state.base_score, ranking.order, weights
            )
            points = s.reward.update(state.points, outcome)
            record = RoundRecord(
                state.round_index,
                groups,
                scores,
                state.base_score,
                True,
                ranking.order,
                ranking.swapped,
                state.points,
                points,
            )
            new_state = TournamentState(
                candidates[ranking.winner],
                float(scores[ranking.winner]),
                points,
                state.round_index + 1,
            )
        if self.on_round is not None:
            self.on_round(record)
        return new_state, record

    def step(
        self, state: TournamentState, rng: np.random.Generator
    ) -> tuple[TournamentState, RoundRecord, list[Any]]:
        """One round. Returns the new state, the record, and the candidates."""
        if self.space is None:
            raise ValueError("this engine has no model space; it can only plan and decide")
        groups, weights = self.plan(state, rng)
        candidates = [
            self.space.propose(state.base, g, w, rng) for g, w in zip(groups, weights, strict=True)
        ]
        scores = np.asarray(self.space.score(candidates), dtype=float)
        new_state, record = self.decide(state, groups, weights, candidates, scores, rng)
        return new_state, record, candidates


class VectorSpace:
    """The paper's simulation: a model is a point; the candidate of a group is
    ``base + delta * (weighted centroid of the members - base)``; scores come from an
    evaluation function against the expert point."""

    def __init__(
        self, vectors: np.ndarray, target: np.ndarray, evaluation: Evaluation, delta: float = 0.1
    ) -> None:
        self.x = np.asarray(vectors, dtype=float)
        self.target = np.asarray(target, dtype=float)
        self.evaluation = evaluation
        self.delta = delta
        self.n_contributors = len(self.x)

    def propose(self, base, members, weights, rng):
        total = weights.sum()
        if total > 0:
            centroid = weights @ self.x[members] / total
        else:  # every member has zero weight: fall back to the plain centroid
            centroid = self.x[members].mean(axis=0)
        return base + self.delta * (centroid - base)

    def score(self, models):
        return self.evaluation(np.asarray(models), self.target)

    def distance(self, model: np.ndarray) -> float:
        return float(np.linalg.norm(model - self.target))
