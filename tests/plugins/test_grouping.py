import numpy as np
import pytest

from crowdsft.plugins.grouping import EpsilonGreedyGrouping, InterleavedGrouping, RandomGrouping

ALL = [RandomGrouping, EpsilonGreedyGrouping, InterleavedGrouping]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(("n", "g"), [(10, 2), (25, 3), (100, 4), (7, 7), (11, 5)])
def test_every_contributor_once_and_sizes_nearly_equal(cls, n, g):
    rng = np.random.default_rng(1)
    points = rng.integers(0, 20, n).astype(float)
    for round_index in (0, 50, 99):
        groups = cls(g).group(points, round_index, 100, rng)
        assert len(groups) == g
        assert sorted(np.concatenate(groups).tolist()) == list(range(n))
        sizes = [len(x) for x in groups]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("cls", ALL)
def test_seeded_determinism(cls):
    points = np.arange(30, dtype=float)
    a = cls(4).group(points, 10, 100, np.random.default_rng(7))
    b = cls(4).group(points, 10, 100, np.random.default_rng(7))
    c = cls(4).group(points, 10, 100, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_interleaved_balances_strong_and_weak():
    points = np.arange(40, dtype=float)  # contributor i has i points
    rng = np.random.default_rng(3)
    for _ in range(20):
        groups = InterleavedGrouping(4).group(points, 0, 100, rng)
        for g in groups:
            weak = np.sum(points[g] < 20)
            strong = np.sum(points[g] >= 20)
            assert weak == strong == 5


def test_epsilon_greedy_schedule_and_tiers():
    eg = EpsilonGreedyGrouping(3)
    assert eg.epsilon(0, 100) == 1.0
    assert eg.epsilon(30, 100) == pytest.approx(0.7)
    assert eg.epsilon(90, 100) == 0.4  # the floor
    points = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    greedy = EpsilonGreedyGrouping(3, floor=0.0)
    groups = greedy.group(points, 100, 100, np.random.default_rng(0))  # epsilon = 0
    assert [sorted(points[g].tolist()) for g in groups] == [[1.0, 2.0], [3.0, 5.0], [7.0, 9.0]]
    # Over many rounds at epsilon 0.4 about 40% of the splits are random.
    rng = np.random.default_rng(5)
    tiers = [
        np.array_equal(np.concatenate(eg.group(points, 99, 100, rng)), np.argsort(points))
        for _ in range(2000)
    ]
    assert 0.55 < np.mean(tiers) < 0.65


def test_epsilon_greedy_jitter_varies_tier_mates_but_keeps_tiers_by_points():
    points = np.arange(40, dtype=float)
    plain = EpsilonGreedyGrouping(4, floor=0.0)
    jittered = EpsilonGreedyGrouping(4, floor=0.0, jitter=0.5)
    rng = np.random.default_rng(3)
    first = [plain.group(points, 100, 100, rng) for _ in range(20)]
    assert all(np.array_equal(g[0], first[0][0]) for g in first)  # always the same tier-mates
    tiers = [jittered.group(points, 100, 100, rng) for _ in range(200)]
    bottoms = {tuple(sorted(g[0].tolist())) for g in tiers}
    assert len(bottoms) > 100  # tier-mates change from round to round ...
    means = np.array([[points[m].mean() for m in g] for g in tiers])
    assert (np.diff(means.mean(axis=0)) > 5).all()  # ... but the tiers still rise with points
    for g in tiers:  # and everyone is still placed once
        assert sorted(np.concatenate(g).tolist()) == list(range(40))
    with pytest.raises(ValueError, match="jitter"):
        EpsilonGreedyGrouping(4, jitter=-1)


def test_too_few_contributors():
    with pytest.raises(ValueError, match="cannot split 2 contributors into 3 groups"):
        RandomGrouping(3).group(np.ones(2), 0, 1, np.random.default_rng())
