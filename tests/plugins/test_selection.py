import numpy as np
import pytest

from crowdsft.plugins.selection import BestWithGuard


def test_guard_blocks_when_nothing_improves():
    sel = BestWithGuard(error=0.0)
    assert sel.select(np.array([-3.0, -2.0]), -2.0, np.random.default_rng()) is None
    r = sel.select(np.array([-3.0, -1.5, -2.5]), -2.0, np.random.default_rng())
    assert r is not None and r.winner == 1 and list(r.order) == [1, 2, 0] and not r.swapped


def test_guard_can_be_turned_off():
    r = BestWithGuard(error=0.0, guard=False).select(np.array([-3.0]), 0.0, np.random.default_rng())
    assert r is not None and r.winner == 0


def test_judging_error_rate_and_uniform_swap():
    sel = BestWithGuard(error=0.05)
    rng = np.random.default_rng(11)
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    swapped_with = []
    trials = 20_000
    for _ in range(trials):
        r = sel.select(scores, 0.0, rng)
        if r.swapped:
            assert r.order[0] != 0 and list(r.order).count(0) == 1
            assert r.order[int(r.order[0])] == 0  # the winner and the swapped group traded places
            swapped_with.append(int(r.order[0]))
        else:
            assert list(r.order) == [0, 1, 2, 3]
    rate = len(swapped_with) / trials
    assert rate == pytest.approx(0.05, abs=0.01)
    counts = np.bincount(swapped_with, minlength=4)[1:]
    assert counts.min() > 0.25 * len(swapped_with)  # each lower rank about a third


def test_no_error_means_no_swap():
    rng = np.random.default_rng(0)
    assert not any(
        BestWithGuard(error=0.0).select(np.array([2.0, 1.0]), 0.0, rng).swapped for _ in range(1000)
    )
