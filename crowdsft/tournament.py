"""The tournament: pure, seeded round logic, shared by every side.

One round::

    base -> group contributors -> one candidate per group -> score candidates and base
         -> select a winner (improvement guard, judging error) -> award points
         -> record the round -> the winner is the next base

``Tournament`` plans a round (groups and influence weights) and decides it (selection and
reward) without knowing what a model is. Whoever trains and scores candidates drives it:

* the paper's simulation passes a ``ModelSpace`` to ``start``/``step``, which propose and
  score candidates in one process;
* the coordinator's round runner plans, trains and scores in persisted steps, then decides;
* ``node verify`` never trains anything: it replays the points of recorded rounds.

The points rule is replayed in one place, ``replay_points``, which the round runner and
ledger verification both call, so the coordinator and every verifier agree by construction.
All randomness comes from the ``numpy.random.Generator`` passed in. Never imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from crowdsft.errors import ConfigError
from crowdsft.plugins.manager import blame
from crowdsft.plugins.reward import Consolidated, Reward, RoundOutcome

if TYPE_CHECKING:
    from crowdsft.plugins.grouping import Grouping
    from crowdsft.plugins.influence import Influence
    from crowdsft.plugins.manager import Plugins
    from crowdsft.plugins.selection import Selection


class ModelSpace(Protocol):
    """Where candidates live: the simulation's vectors, the coordinator's LoRA adapters."""

    n_contributors: int

    def propose(
        self, base: Any, members: np.ndarray, weights: np.ndarray, rng: np.random.Generator
    ) -> Any:
        """A candidate trained from ``base`` on the data of ``members`` (their influence
        ``weights`` given)."""
        ...

    def score(self, models: Sequence[Any]) -> np.ndarray:
        """Scores of ``models`` against the target; higher is better."""
        ...


# -- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategies:
    grouping: Grouping
    selection: Selection
    reward: Reward
    influence: Influence


@dataclass(frozen=True)
class StrategyNames:
    """The strategies of a tournament by name, with their settings: the one place that turns
    names into ``Strategies`` (the coordinator's ``[rounds]``, the simulation's cells and
    their tests all build through it). ``options`` holds extra keyword options per kind
    (``{"reward": {...}}``)."""

    grouping: str = "random"
    groups: int = 3
    selection: str = "best"
    judging_error: float = 0.05
    reward: str = "rank"
    influence: str = "points-squared"
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def build(self, plugins: Plugins | None = None) -> Strategies:
        from crowdsft.plugins.manager import get_plugins

        p = plugins or get_plugins()
        o = self.options
        return Strategies(
            grouping=p.create(
                "grouping", self.grouping, groups=self.groups, **o.get("grouping", {})
            ),
            selection=p.create(
                "selection", self.selection, error=self.judging_error, **o.get("selection", {})
            ),
            reward=p.create("reward", self.reward, **o.get("reward", {})),
            influence=p.create("influence", self.influence, **o.get("influence", {})),
        )

    def as_dict(self) -> dict[str, Any]:
        """The names and settings as a ledger record lists them (``options`` only where a
        strategy has some: nodes rebuild the reward rule with them)."""
        out: dict[str, Any] = {
            "grouping": self.grouping,
            "groups": self.groups,
            "selection": self.selection,
            "judging_error": self.judging_error,
            "reward": self.reward,
            "influence": self.influence,
        }
        options = {k: dict(v) for k, v in self.options.items() if v}
        if options:
            out["options"] = options
        return out


# -- what a round decided -----------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRecord:
    """Everything a round decided: the reward rule's view of it (``outcome``) plus the
    decision and the points. ``population`` names the contributors the group indices point
    into (node ids in the coordinator; ``"0"``, ``"1"``, ... in the simulation)."""

    outcome: RoundOutcome
    updated: bool  # False when the improvement guard kept the old model
    swapped: bool  # a judging error struck
    points_before: np.ndarray
    points_after: np.ndarray
    population: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # every candidate best first after any judging error, the consolidated one as index
    # len(groups); None: the groups' order is the whole ranking (no consolidated candidate)
    ranking: np.ndarray | None = None

    @property
    def round_index(self) -> int:
        return self.outcome.round_index

    @property
    def groups(self) -> Sequence[np.ndarray]:
        return self.outcome.groups

    @property
    def weights(self) -> Sequence[np.ndarray] | None:
        return self.outcome.weights

    @property
    def scores(self) -> np.ndarray:
        return self.outcome.scores

    @property
    def base_score(self) -> float:
        return self.outcome.base_score

    @property
    def order(self) -> np.ndarray | None:
        """Every candidate best first after any judging error (the consolidated candidate,
        where there is one, as index ``len(groups)``); None when nothing was updated."""
        if not self.updated:
            return None
        return self.ranking if self.ranking is not None else self.outcome.order

    @property
    def consolidated(self) -> Consolidated | None:
        return self.outcome.consolidated

    @property
    def group_nodes(self) -> list[list[str]]:
        """The members of each group, by name (node ids in the coordinator)."""
        return [[self.population[int(i)] for i in g] for g in self.outcome.groups]

    @property
    def winner(self) -> int | None:
        """The winning candidate: a group's, or ``len(groups)`` for the consolidated one."""
        order = self.order
        return int(order[0]) if order is not None else None

    @property
    def winner_score(self) -> float:
        w = self.winner
        if w is None:
            return self.base_score
        c = self.outcome.consolidated
        if c is not None and w == len(self.groups):
            return float(c.score)
        return float(self.scores[w])


@dataclass
class TournamentState:
    base: Any
    base_score: float
    points: np.ndarray
    round_index: int = 0


def award(reward: Reward, points: np.ndarray, outcome: RoundOutcome, updated: bool) -> np.ndarray:
    """The reward rule's step for one decided round: it observes every round, and changes
    points only when the round updated the model."""
    with blame("reward", reward):
        reward.observe(outcome)
        return reward.update(points, outcome) if updated else points


@dataclass(frozen=True)
class DecidedRound:
    """A finished round as the points rule replays it, in node ids (from a ledger record)."""

    round_id: int
    groups: list[list[str]]
    weights: list[list[float]]
    scores: list[float]
    base_score: float
    updated: bool
    ranking: list[int]  # every candidate, the consolidated one as len(groups)
    credits: list[list[float]] | None = None  # members' in-run credit, where recorded
    consolidated: DecidedConsolidated | None = None

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> DecidedRound:
        n = len(rec["groups"])
        groups = rec["candidates"][:n]
        extra = rec.get("consolidated")
        consolidated = None
        if extra is not None:
            cand = rec["candidates"][n]
            consolidated = DecidedConsolidated(
                members=[str(m) for m in extra["members"]],
                weights=[float(x) for x in extra["weights"]],
                score=float(cand["score"]),
                credits=(
                    [float(x) for x in cand["member_credit"]] if "member_credit" in cand else None
                ),
            )
        return cls(
            round_id=int(rec["round_id"]),
            groups=[list(g) for g in rec["groups"]],
            weights=[[float(x) for x in w] for w in rec["weights"]],
            scores=[float(c["score"]) for c in groups],
            base_score=float(rec["base_score"]),
            updated=bool(rec["updated"]),
            ranking=[int(x) for x in rec["ranking"]] if rec["updated"] else [],
            credits=(
                [[float(x) for x in c["member_credit"]] for c in groups]
                if groups and all("member_credit" in c for c in groups)
                else None
            ),
            consolidated=consolidated,
        )

    def outcome(self, index: Mapping[str, int]) -> RoundOutcome:
        """The reward rule's view of this round over a population ``index`` (node -> position)."""
        named = {n for g in self.groups for n in g}
        if self.consolidated is not None:
            named |= set(self.consolidated.members)
        missing = sorted(n for n in named if n not in index)
        if missing:
            raise ValueError(
                f"round {self.round_id} names contributors missing from the population: "
                + ", ".join(missing[:3])
            )
        n_groups = len(self.groups)
        ranking = self.ranking if self.updated else []
        c = self.consolidated
        return RoundOutcome(
            self.round_id - 1,
            [np.array([index[n] for n in g], dtype=np.int64) for g in self.groups],
            np.asarray(self.scores, dtype=float),
            self.base_score,
            np.asarray([g for g in ranking if g < n_groups], dtype=np.int64),
            [np.asarray(w, dtype=float) for w in self.weights],
            None if self.credits is None else [np.asarray(c, dtype=float) for c in self.credits],
            None
            if c is None
            else Consolidated(
                members=np.array([index[m] for m in c.members], dtype=np.int64),
                weights=np.asarray(c.weights, dtype=float),
                score=c.score,
                won=bool(ranking) and ranking[0] == n_groups,
                credits=None if c.credits is None else np.asarray(c.credits, dtype=float),
            ),
        )


@dataclass(frozen=True)
class DecidedConsolidated:
    """A recorded round's consolidated candidate, in node ids."""

    members: list[str]
    weights: list[float]
    score: float
    credits: list[float] | None = None


def replay_points(
    reward: Reward,
    population: Sequence[str],
    earlier: Sequence[DecidedRound],
    awarded: Mapping[str, float],
) -> np.ndarray:
    """The points (1 + points awarded so far) over ``population`` from which the next round
    is decided, with ``reward``'s state rebuilt from the ``earlier`` finished rounds.

    Every contributor starts at 1. A rule that adds to what contributors hold continues from
    ``awarded``; a rule that ``replaces_points`` computes everyone's points afresh from the
    history it has observed. The coordinator's round runner and ledger verification both
    decide through this function.
    """
    index = {n: i for i, n in enumerate(population)}
    with blame("reward", reward):
        reward.reset(len(population))
    replayed = np.ones(len(population))
    for old in earlier:
        replayed = award(reward, replayed, old.outcome(index), old.updated)
    if getattr(reward, "replaces_points", False):
        return replayed
    return np.array([1.0 + awarded.get(n, 0.0) for n in population])


def check_credit(reward: Reward, space: Any) -> None:
    """Refuse, before any training, a reward rule that pays from in-run credit (its
    ``needs_credit``) over a space whose training records none."""
    if getattr(reward, "needs_credit", False) and not getattr(space, "records_credit", False):
        raise ConfigError(
            "this reward rule pays from in-run credit, and the model space records none "
            "(the coordinator's LLM rounds do; the vector simulation cannot): choose another "
            "reward"
        )


# -- the engine ---------------------------------------------------------------------------------


class Tournament:
    """Plans and decides rounds with ``strategies``; ``rounds`` is the schedule length that
    grouping strategies may assume (epsilon-greedy anneals over it)."""

    def __init__(
        self,
        strategies: Strategies,
        rounds: int,
        on_round: Callable[[RoundRecord], None] | None = None,
        consolidate_every: int = 0,
    ) -> None:
        """``consolidate_every``: k > 0 adds a consolidated candidate to every k-th round
        (``consolidates``); 0: none."""
        if consolidate_every < 0:
            raise ValueError("consolidate_every must be >= 0")
        self.strategies = strategies
        self.rounds = rounds
        self.on_round = on_round
        self.consolidate_every = consolidate_every

    def consolidates(self, round_index: int) -> bool:
        """Whether round ``round_index`` (from 0) has a consolidated candidate: every
        ``consolidate_every``-th round, counted from 1 (k = 1: every round)."""
        k = self.consolidate_every
        return k > 0 and (round_index + 1) % k == 0

    def plan_consolidated(self, points: np.ndarray) -> np.ndarray:
        """The influence weight of every contributor in ``points`` (the consolidated
        candidate's members) on the consolidated candidate."""
        with blame("influence", self.strategies.influence):
            return self.strategies.influence.weights(points)

    def plan(
        self, points: np.ndarray, round_index: int, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Groups for this round and each member's influence weight."""
        s = self.strategies
        with blame("grouping", s.grouping):
            groups = s.grouping.group(points, round_index, self.rounds, rng)
        with blame("influence", s.influence):
            weights = [s.influence.weights(points[g]) for g in groups]
        return groups, weights

    def decide(
        self,
        round_index: int,
        groups: list[np.ndarray],
        weights: list[np.ndarray],
        scores: np.ndarray,
        base_score: float,
        points: np.ndarray,
        rng: np.random.Generator,
        population: Sequence[str] = (),
        credits: Sequence[np.ndarray] | None = None,
        consolidated: Consolidated | None = None,
    ) -> RoundRecord:
        """Selection (guard, judging error) and reward, given the scored candidates
        (``credits``: each group's members' in-run credit, where the training recorded it).

        ``consolidated`` (its ``won`` is ignored and decided here) competes in the same
        selection as the groups' candidates, as index ``len(groups)``; the reward sees the
        groups ranked among themselves and whether the consolidated candidate won."""
        s = self.strategies
        scores = np.asarray(scores, dtype=float)
        n_groups = len(groups)
        every = scores if consolidated is None else np.append(scores, consolidated.score)
        with blame("selection", s.selection):
            ranking = s.selection.select(every, base_score, rng)
        full = ranking.order if ranking is not None else np.empty(0, dtype=np.int64)
        order = np.asarray([g for g in full if g < n_groups], dtype=np.int64)
        if consolidated is not None:
            won = ranking is not None and int(full[0]) == n_groups
            consolidated = dataclasses.replace(consolidated, won=won)
        outcome = RoundOutcome(
            round_index, groups, scores, base_score, order, weights, credits, consolidated
        )
        after = award(s.reward, points, outcome, ranking is not None)
        names = tuple(population) or tuple(str(i) for i in range(len(points)))
        record = RoundRecord(
            outcome,
            updated=ranking is not None,
            swapped=bool(ranking.swapped) if ranking is not None else False,
            points_before=points,
            points_after=after,
            population=names,
            ranking=np.asarray(full, dtype=np.int64),
        )
        if self.on_round is not None:
            self.on_round(record)
        return record

    # -- driving a whole tournament in one process, over a model space ------------------------

    def start(self, space: ModelSpace, base: Any, initial_points: float = 1.0) -> TournamentState:
        check_credit(self.strategies.reward, space)
        with blame("reward", self.strategies.reward):
            self.strategies.reward.reset(space.n_contributors)
        score = float(space.score([base])[0])
        points = np.full(space.n_contributors, float(initial_points))
        return TournamentState(base=base, base_score=score, points=points)

    def step(
        self, space: ModelSpace, state: TournamentState, rng: np.random.Generator
    ) -> tuple[TournamentState, RoundRecord, list[Any]]:
        """One round. Returns the new state, the record, and the candidates."""
        groups, weights = self.plan(state.points, state.round_index, rng)
        candidates = [
            space.propose(state.base, g, w, rng) for g, w in zip(groups, weights, strict=True)
        ]
        scores = np.asarray(space.score(candidates), dtype=float)
        consolidated = None
        if self.consolidates(state.round_index):
            everyone = np.arange(len(state.points))
            w_all = self.plan_consolidated(state.points)
            candidates.append(space.propose(state.base, everyone, w_all, rng))
            score = float(space.score([candidates[-1]])[0])
            consolidated = Consolidated(everyone, w_all, score, won=False)
        record = self.decide(
            state.round_index,
            groups,
            weights,
            scores,
            state.base_score,
            state.points,
            rng,
            consolidated=consolidated,
        )
        if record.updated:
            w = record.winner
            assert w is not None
            new = TournamentState(
                candidates[w], record.winner_score, record.points_after, state.round_index + 1
            )
        else:
            new = TournamentState(
                state.base, state.base_score, record.points_after, state.round_index + 1
            )
        return new, record, candidates
