"""Reward rules: the points every contributor holds after a round.

* ``rank``: every member of the group at rank r (0 = winner) gets G - r points (the paper).
* ``marginal``: every member gets its candidate's improvement over the current model
  (the paper's earlier rule).
* ``regression``: ours. Each contributor's points estimate its individual contribution,
  fitted by least squares to the scores of every group it has been in across all rounds so
  far; see ``RegressionReward``.
* ``credit``: ours, for the LLM path. Each contributor's points are the in-run credit of its
  examples (their first-order effect on the target loss) over the rounds whose winner trained
  the model; see ``CreditReward``.

A rule sees the whole round (``RoundOutcome``) and returns the new points of everyone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .hookspecs import Register, hookimpl


@dataclass(frozen=True)
class Consolidated:
    """A round's consolidated candidate: trained from the round's model on the data of
    every contributor so far (``members``), each weighted by its influence weight; it
    competes in the same selection as the group candidates."""

    members: np.ndarray
    weights: np.ndarray
    score: float  # higher is better
    won: bool  # it became the next model
    credits: np.ndarray | None = None  # members' in-run credit, where recorded


@dataclass(frozen=True)
class RoundOutcome:
    """What a reward rule may look at after a round.

    ``order`` ranks the group candidates among themselves (best first, after any judging
    error), also in a round that the consolidated candidate won: the groups' ranking is
    still evidence of whose data helps, and the consolidated candidate, made of everyone's
    data, tells nobody apart. ``consolidated`` is None in rounds without one."""

    round_index: int
    groups: Sequence[np.ndarray]
    scores: np.ndarray  # one per group, higher is better
    base_score: float  # the current model's score before the round
    order: np.ndarray  # groups best first, after any judging error
    weights: Sequence[np.ndarray] | None = None  # members' influence weights, per group
    # members' in-run credit against the target, per group (LLM rounds with in-run credit)
    credits: Sequence[np.ndarray] | None = None
    consolidated: Consolidated | None = None


class Reward(ABC):
    """Turns round outcomes into points. ``reset`` before a new tournament.

    ``replaces_points``: False for rules that add to the points a contributor holds (the
    coordinator then continues from the points in its ledger); True for rules that compute
    everyone's points afresh from the history they observed (the coordinator rebuilds that
    history by replaying the finished rounds before each decision).
    """

    replaces_points = False

    def reset(self, n_contributors: int) -> None:  # noqa: B027 - optional hook
        """Forget everything (a new tournament of ``n_contributors``)."""

    def observe(self, outcome: RoundOutcome) -> None:  # noqa: B027 - optional hook
        """See every round's candidates, also those of rounds in which the improvement guard
        kept the old model (``outcome.order`` is then empty). No points change here."""

    @abstractmethod
    def update(self, points: np.ndarray, outcome: RoundOutcome) -> np.ndarray:
        """The points after a round in which an update happened (a new array). ``observe``
        has already seen the same outcome."""


class RankReward(Reward):
    """Members of the group ranked r (0 = winner) get G - r points."""

    def update(self, points, outcome):
        new = points.astype(float, copy=True)
        n_groups = len(outcome.groups)
        for rank, g in enumerate(outcome.order):
            new[outcome.groups[g]] += n_groups - rank
        return new


class MarginalReward(Reward):
    """Members get their candidate's score minus the current model's score."""

    def update(self, points, outcome):
        new = points.astype(float, copy=True)
        for g, members in enumerate(outcome.groups):
            new[members] += outcome.scores[g] - outcome.base_score
        return new


class RegressionReward(Reward):
    """Points from a least-squares estimate of each contributor's own contribution.

    Every candidate ever scored is one observation, in every round, also in rounds where the
    improvement guard kept the old model: its improvement over the model it was trained from,
    ``score_g - base_score``, explained as the influence-weighted mean of its members'
    contributions ``beta_i`` (a candidate is built from its members' weighted data) plus a
    per-round offset that absorbs how hard that round's starting point was. Contributors are
    mixed into different groups round after round, so the system becomes identifiable as
    rounds accumulate; a small ridge term (``ridge``, relative to the data) keeps it
    well-posed before that. Improvements are measured near the current model, and the model
    moves, so older rounds count less: an observation ``k`` rounds old weighs ``decay**k``.

    Points are the estimates mapped affinely onto [1, ``scale``]: positive, so that
    ``points-squared`` influence stays meaningful, and with a moderate spread (influence
    weights within 1 to ``scale``²), so that weak contributors still weigh enough in their
    groups for their contribution to be measured. Correlation with Shapley values does not
    depend on the map. The defaults (decay 0.92, scale 2) were chosen on the paper's
    simulation at 100 users and 4 groups (``bench/simulation.py``).
    """

    replaces_points = True

    def __init__(
        self,
        ridge: float = 1e-3,
        decay: float = 0.92,
        scale: float = 2.0,
    ) -> None:
        if ridge < 0 or not 0 < decay <= 1:
            raise ValueError("ridge must be >= 0 and decay in (0, 1]")
        self.ridge = ridge
        self.decay = decay
        self.scale = scale
        self.reset(0)

    def reset(self, n_contributors: int) -> None:
        self.n = n_contributors
        self._rows: list[np.ndarray] = []
        self._y: list[float] = []
        self._round: list[int] = []

    def estimates(self) -> np.ndarray:
        """The current least-squares contributions (centred), one per contributor."""
        if not self._rows:
            return np.zeros(self.n)
        rounds = sorted(set(self._round))
        col = {r: i for i, r in enumerate(rounds)}
        a = np.zeros((len(self._rows), self.n + len(rounds)))
        a[:, : self.n] = np.asarray(self._rows)
        a[np.arange(len(self._rows)), self.n + np.array([col[r] for r in self._round])] = 1.0
        y = np.asarray(self._y)
        last = max(self._round)
        w = self.decay ** (last - np.asarray(self._round, dtype=float))
        w = np.sqrt(w)
        a *= w[:, None]
        y = y * w
        # Ridge on the contributions only (scaled to the data); the round offsets are free.
        ata = a.T @ a
        n = self.n
        ata[:n, :n] += (self.ridge * np.trace(ata[:n, :n]) / n + 1e-12) * np.eye(n)
        beta = np.linalg.lstsq(ata, a.T @ y, rcond=None)[0][:n]
        return beta - beta.mean()

    def observe(self, outcome):
        for g, members in enumerate(outcome.groups):
            row = np.zeros(self.n)
            w = (
                np.asarray(outcome.weights[g], dtype=float)
                if outcome.weights is not None
                else np.ones(len(members))
            )
            total = w.sum()
            row[members] = w / total if total > 0 else 1.0 / len(members)
            self._rows.append(row)
            self._y.append(float(outcome.scores[g] - outcome.base_score))
            self._round.append(outcome.round_index)
        c = outcome.consolidated
        if c is not None:  # one more observation: everyone, at their influence weights
            row = np.zeros(self.n)
            w = np.asarray(c.weights, dtype=float)
            total = w.sum()
            row[c.members] = w / total if total > 0 else 1.0 / len(c.members)
            self._rows.append(row)
            self._y.append(float(c.score - outcome.base_score))
            self._round.append(outcome.round_index)

    def update(self, points, outcome):
        beta = self.estimates()
        span = beta.max() - beta.min()
        if span <= 0:
            return np.ones(self.n)
        return 1.0 + (self.scale - 1.0) * (beta - beta.min()) / span


class CreditReward(Reward):
    """Points from in-run credit: every example that trained the model is credited, as the
    candidate trains, with its first-order effect on the loss of the target's responses
    (``coordinator.training.valuation.InRunCredit``); a contributor's contribution is the
    sum over the rounds whose candidate became the next model (members of candidates that
    were not taken changed nothing, and score zero for that round).

    That sum is a one-run estimate of the contributor's value to the model that was built
    (Wang et al.'s "data Shapley in one training run", first order). It needs no group
    ranking to be inverted, so it does not depend on the grouping being identifiable; it
    does depend on the target's loss standing in for the evaluation (the coordinator
    chooses by embedding distance of generated answers).

    Points are the sums mapped affinely onto [1, ``scale``], as ``regression`` does
    (positive, for influence weights); the map does not change correlations. Needs rounds
    that record credit: the coordinator's LLM rounds do under this rule (it turns in-run
    credit on); the vector simulation has none, and the rule refuses it. Rounds decided
    before credit was recorded (under another rule) pay nobody.

    The credit is the effect the data had with the weight it was given: under
    ``points-squared`` influence a member holding more points has its examples weighted
    more, so the same data earns more (up to ``scale``² times). Use ``influence = "uniform"``
    to pay for the data alone."""

    replaces_points = True
    needs_credit = True  # the coordinator turns in-run credit on and signs it into the ledger

    def __init__(self, scale: float = 2.0) -> None:
        if scale <= 1:
            raise ValueError("scale must be > 1")
        self.scale = scale
        self.reset(0)

    def reset(self, n_contributors: int) -> None:
        self.n = n_contributors
        self.totals = np.zeros(n_contributors)

    def observe(self, outcome):
        if len(outcome.order) == 0:
            return  # the old model was kept: nobody's data trained it this round
        c = outcome.consolidated
        if c is not None and c.won:  # everyone's data trained the new model
            if c.credits is None:
                return  # decided before credit was recorded: pays nobody
            credit = np.asarray(c.credits, dtype=float)
            if credit.shape != (len(c.members),):
                raise ValueError("one in-run credit per member of the consolidated candidate")
            self.totals[c.members] += credit
            return
        if outcome.credits is None:
            # A round decided before credit was recorded (under another rule): it pays
            # nobody. The coordinator refuses to decide a new round without credit.
            return
        w = int(outcome.order[0])
        credit = np.asarray(outcome.credits[w], dtype=float)
        if credit.shape != (len(outcome.groups[w]),):
            raise ValueError("one in-run credit per member of the winning group is needed")
        self.totals[outcome.groups[w]] += credit

    def update(self, points, outcome):
        span = self.totals.max() - self.totals.min()
        if span <= 1e-9 * max(float(np.abs(self.totals).max()), 1e-300):
            return np.ones(self.n)  # nothing (or only rounding noise) tells anyone apart
        return 1.0 + (self.scale - 1.0) * (self.totals - self.totals.min()) / span


@hookimpl
def crowdsft_register_reward(register: Register) -> None:
    register("rank", RankReward)
    register("marginal", MarginalReward)
    register("regression", RegressionReward)
    register("credit", CreditReward)
