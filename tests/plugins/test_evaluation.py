import numpy as np
import pytest

from crowdsft.plugins.evaluation import L1, L2, Cosine, Dot

E = np.array([3.0, 4.0])
A = np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [-4.0, 3.0]])


def test_l2():
    np.testing.assert_allclose(L2()(A, E), [0.0, -5.0, -5.0, -np.sqrt(50)])


def test_l1():
    np.testing.assert_allclose(L1()(A, E), [0.0, -7.0, -7.0, -8.0])


def test_dot():
    np.testing.assert_allclose(Dot()(A, E), [25.0, 0.0, 50.0, 0.0])


def test_cosine():
    np.testing.assert_allclose(Cosine()(A, E), [1.0, 0.0, 1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("f", [L1(), L2(), Cosine()])
def test_the_target_itself_scores_best(f):
    rng = np.random.default_rng(0)
    others = rng.normal(size=(50, 2)) * 3
    assert f(E[None, :], E)[0] >= f(others, E).max()


def test_batched_shapes():
    batch = np.zeros((4, 5, 2))
    assert L2()(batch, E).shape == (4, 5)
