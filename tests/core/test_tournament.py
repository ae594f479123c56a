import numpy as np
import pytest

from crowdsft.plugins.evaluation import L2
from crowdsft.plugins.grouping import RandomGrouping
from crowdsft.plugins.influence import PointsSquared, Uniform
from crowdsft.plugins.reward import RankReward
from crowdsft.plugins.selection import BestWithGuard
from crowdsft.simulation.game import VectorSpace
from crowdsft.tournament import Strategies, Tournament


class Runner:
    """A tournament driven over one vector space."""

    def __init__(self, space, tournament):
        self.space, self.tournament = space, tournament

    def start(self, base):
        return self.tournament.start(self.space, base)

    def step(self, state, rng):
        return self.tournament.step(self.space, state, rng)


def make(n=12, groups=3, error=0.0, seed=0, influence=None):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 5, (n, 4))
    e = rng.uniform(0, 5, 4)
    space = VectorSpace(x, e, L2(), delta=0.1)
    strategies = Strategies(
        RandomGrouping(groups), BestWithGuard(error=error), RankReward(), influence or Uniform()
    )
    return space, Runner(space, Tournament(strategies, rounds=20))


def test_vector_space_candidate_formula():
    space = VectorSpace(np.array([[0.0, 0.0], [4.0, 2.0], [8.0, 8.0]]), np.zeros(2), L2(), 0.5)
    cand = space.propose(np.array([2.0, 2.0]), np.array([0, 1]), np.array([1.0, 3.0]), None)
    # weighted centroid (3, 1.5); base + 0.5 * (centroid - base)
    np.testing.assert_allclose(cand, [2.5, 1.75])
    zero = space.propose(np.array([2.0, 2.0]), np.array([0, 1]), np.zeros(2), None)
    np.testing.assert_allclose(zero, [2.0, 1.5])  # all weights zero: plain centroid


def test_a_round_picks_the_best_candidate_and_it_becomes_the_base():
    _, engine = make()
    state = engine.start(np.full(4, 10.0))  # far away: some candidate must improve
    new, record, candidates = engine.step(state, np.random.default_rng(1))
    assert record.updated and record.winner == int(np.argmax(record.scores))
    np.testing.assert_allclose(new.base, candidates[record.winner])
    assert new.base_score == pytest.approx(record.scores.max())
    assert sorted(np.concatenate(record.groups).tolist()) == list(range(12))
    # rank points: G - rank for every member
    for rank, g in enumerate(record.order):
        np.testing.assert_allclose(new.points[record.groups[g]], 1 + 3 - rank)


def test_the_guard_keeps_the_model_and_awards_nothing():
    space, engine = make()
    best = space.target.copy()  # the target itself cannot be improved on
    state = engine.start(best)
    new, record, _ = engine.step(state, np.random.default_rng(2))
    assert not record.updated and record.order is None and record.winner is None
    np.testing.assert_array_equal(new.base, best)
    np.testing.assert_array_equal(new.points, state.points)
    assert new.round_index == 1


def test_seeded_runs_are_identical():
    def run(seed):
        _, engine = make(error=0.05, influence=PointsSquared())
        state = engine.start(np.full(4, 9.0))
        rng = np.random.default_rng(seed)
        for _ in range(20):
            state, _, _ = engine.step(state, rng)
        return state

    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a.base, b.base)
    np.testing.assert_array_equal(a.points, b.points)
    assert not np.array_equal(a.points, c.points)


def test_distance_falls_over_rounds():
    space, engine = make(n=30)
    state = engine.start(np.full(4, 20.0))
    start = space.distance(state.base)
    rng = np.random.default_rng(0)
    for _ in range(30):
        state, _, _ = engine.step(state, rng)
    assert space.distance(state.base) < start / 2


def test_a_consolidated_candidate_competes_and_the_groups_are_paid_by_their_own_order():
    """Every round a candidate of everyone's data (at the points' influence weights) joins
    the selection; where it wins it becomes the base, and the rank reward pays the groups
    by their order among themselves."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, (9, 4))
    space = VectorSpace(x, x.mean(axis=0), L2(), delta=1.0)  # the crowd mean is the target
    strategies = Strategies(RandomGrouping(3), BestWithGuard(error=0.0), RankReward(), Uniform())
    engine = Runner(space, Tournament(strategies, rounds=5, consolidate_every=1))
    state = engine.start(np.full(4, 10.0))
    new, record, candidates = engine.step(state, np.random.default_rng(1))
    assert len(candidates) == 4 and record.consolidated is not None
    assert record.winner == 3 and record.consolidated.won  # everyone's mean: nearest
    np.testing.assert_allclose(new.base, candidates[3])
    assert new.base_score == pytest.approx(record.consolidated.score)
    assert record.order[0] == 3 and sorted(record.order.tolist()) == [0, 1, 2, 3]
    assert record.outcome.order.tolist() == [g for g in record.order.tolist() if g < 3]
    for rank, g in enumerate(record.outcome.order):
        np.testing.assert_allclose(new.points[record.groups[g]], 1 + 3 - rank)


def test_consolidate_every_k_rounds():
    strategies = Strategies(RandomGrouping(2), BestWithGuard(error=0.0), RankReward(), Uniform())
    engine = Tournament(strategies, rounds=6, consolidate_every=3)
    assert [engine.consolidates(r) for r in range(6)] == [False, False, True] * 2
    assert not any(Tournament(strategies, rounds=6).consolidates(r) for r in range(6))
    with pytest.raises(ValueError):
        Tournament(strategies, rounds=6, consolidate_every=-1)
