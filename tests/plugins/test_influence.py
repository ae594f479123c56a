import numpy as np
import pytest

from crowdsft.plugins.influence import PointsSquared, Uniform
from crowdsft.plugins.manager import get_plugins


def test_points_squared_weighs_members_by_the_square_of_their_points():
    np.testing.assert_allclose(PointsSquared().weights(np.array([1.0, 2.0, 3.5])), [1, 4, 12.25])


def test_uniform_weighs_every_member_the_same_whatever_their_points():
    w = Uniform().weights(np.array([1.0, 7.0, 0.0]))
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    assert w.dtype == float


@pytest.mark.parametrize("name", ["points-squared", "uniform"])
def test_influence_rules_by_name_give_non_negative_weights_per_member(name):
    rule = get_plugins().create("influence", name)
    points = np.array([0.0, 1.0, 2.5, 10.0])
    w = rule.weights(points)
    assert w.shape == points.shape and np.all(w >= 0)
