import dataclasses

import numpy as np
import pytest

from crowdsft.plugins.influence import PointsSquared, Uniform
from crowdsft.plugins.reward import (
    CreditReward,
    MarginalReward,
    RankReward,
    RegressionReward,
    RoundOutcome,
)

GROUPS = [np.array([0, 1]), np.array([2, 3]), np.array([4])]


def outcome(scores, order, base=0.0, round_index=0, groups=GROUPS, weights=None):
    return RoundOutcome(
        round_index, groups, np.asarray(scores, float), base, np.asarray(order), weights
    )


def test_rank_reward_gives_g_minus_rank_to_every_member():
    points = np.ones(5)
    new = RankReward().update(points, outcome([1.0, 3.0, 2.0], [1, 2, 0]))
    np.testing.assert_allclose(new, [1 + 1, 1 + 1, 1 + 3, 1 + 3, 1 + 2])
    assert points.tolist() == [1.0] * 5  # a new array; the input is untouched


def test_rank_reward_follows_the_order_after_a_judging_error():
    new = RankReward().update(np.zeros(5), outcome([1.0, 3.0, 2.0], [2, 1, 0]))
    np.testing.assert_allclose(new, [1, 1, 2, 2, 3])


def test_marginal_reward_is_the_improvement():
    new = MarginalReward().update(np.ones(5), outcome([1.0, 3.0, 2.5], [1, 2, 0], base=2.0))
    np.testing.assert_allclose(new, [0.0, 0.0, 2.0, 2.0, 1.5])


def test_regression_recovers_additive_contributions():
    """If a group's improvement is the mean of its members' contributions, the fit finds them."""
    rng = np.random.default_rng(0)
    n, g = 30, 3
    beta = rng.normal(size=n)
    reward = RegressionReward(ridge=1e-6, decay=1.0)
    reward.reset(n)
    points = np.ones(n)
    for t in range(60):
        groups = np.array_split(rng.permutation(n), g)
        base = rng.normal()  # each round starts from another model
        scores = np.array([base + beta[m].mean() for m in groups])
        out = RoundOutcome(t, groups, scores, base, np.argsort(-scores))
        reward.observe(out)
        points = reward.update(points, out)
    est = reward.estimates()
    assert np.corrcoef(est, beta)[0, 1] > 0.999
    assert points.min() == pytest.approx(1.0) and points.max() == pytest.approx(2.0)
    assert np.corrcoef(points, beta)[0, 1] > 0.999


def test_regression_uses_influence_weights():
    rng = np.random.default_rng(1)
    n = 12
    beta = rng.normal(size=n)
    w = rng.uniform(0.5, 4.0, size=n)
    reward = RegressionReward(ridge=1e-6, decay=1.0)
    reward.reset(n)
    for t in range(40):
        groups = np.array_split(rng.permutation(n), 3)
        scores = np.array([w[m] @ beta[m] / w[m].sum() for m in groups])
        reward.observe(
            RoundOutcome(t, groups, scores, 0.0, np.argsort(-scores), [w[m] for m in groups])
        )
    assert np.corrcoef(reward.estimates(), beta)[0, 1] > 0.999


def test_regression_before_any_data_and_bad_options():
    r = RegressionReward()
    r.reset(4)
    np.testing.assert_array_equal(r.estimates(), np.zeros(4))
    with pytest.raises(ValueError):
        RegressionReward(decay=0.0)


def test_influence_rules():
    p = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(PointsSquared().weights(p), [1.0, 4.0, 9.0])
    np.testing.assert_allclose(Uniform().weights(p), [1.0, 1.0, 1.0])


def test_credit_reward_sums_the_winners_credit_and_maps_it_onto_one_to_scale():
    reward = CreditReward(scale=3.0)
    reward.reset(5)
    credits = [np.array([0.5, -0.1]), np.array([2.0, 2.0]), np.array([9.0])]
    first = RoundOutcome(
        0, GROUPS, np.array([1.0, 3.0, 2.0]), 0.0, np.array([0, 2, 1]), credits=credits
    )
    reward.observe(first)
    points = reward.update(np.ones(5), first)
    # only the winning group's members are credited: 0.5 and -0.1; the others hold 0
    np.testing.assert_allclose(reward.totals, [0.5, -0.1, 0, 0, 0])
    np.testing.assert_allclose(points, 1 + 2 * (reward.totals + 0.1) / 0.6)
    kept = RoundOutcome(
        1, GROUPS, np.array([0, 0, 0.0]), 5.0, np.array([], dtype=int), credits=credits
    )
    reward.observe(kept)  # the old model was kept: nobody's data trained it
    np.testing.assert_allclose(reward.totals, [0.5, -0.1, 0, 0, 0])
    second = RoundOutcome(
        2, GROUPS, np.array([1.0, 3.0, 2.0]), 0.0, np.array([2, 1, 0]), credits=credits
    )
    reward.observe(second)
    np.testing.assert_allclose(reward.totals, [0.5, -0.1, 0, 0, 9.0])
    assert reward.update(points, second).argmax() == 4


def test_credit_reward_pays_nobody_for_rounds_decided_without_credit():
    """Rounds decided under another rule (before credit was recorded) replay as paying no
    one; the coordinator refuses to decide a new round without credit."""
    reward = CreditReward()
    reward.reset(5)
    reward.observe(outcome([1.0, 3.0, 2.0], [1, 2, 0]))
    assert reward.totals.tolist() == [0.0] * 5
    assert reward.update(np.full(5, 3.0), outcome([1.0, 3.0, 2.0], [1, 2, 0])).tolist() == [1.0] * 5


def test_a_rule_that_pays_from_credit_is_refused_where_nothing_records_it():
    from crowdsft.errors import ConfigError
    from crowdsft.tournament import check_credit

    class NoCredit:
        pass

    class WithCredit:
        records_credit = True

    with pytest.raises(ConfigError, match="in-run credit"):
        check_credit(CreditReward(), NoCredit())
    check_credit(CreditReward(), WithCredit())
    check_credit(RankReward(), NoCredit())


def test_regression_and_credit_see_the_consolidated_candidate():
    from crowdsft.plugins.reward import Consolidated, RegressionReward

    everyone = np.arange(5)
    c = Consolidated(everyone, np.ones(5), 4.0, won=True, credits=np.array([1, 2, 3, 4, -1.0]))
    won = RoundOutcome(
        0, GROUPS, np.array([1.0, 3.0, 2.0]), 0.0, np.array([1, 2, 0]), consolidated=c
    )
    regression = RegressionReward()
    regression.reset(5)
    regression.observe(won)
    assert len(regression._rows) == 4  # the three groups and the consolidated candidate
    np.testing.assert_allclose(regression._rows[-1], np.full(5, 0.2))
    credit = CreditReward()
    credit.reset(5)
    credit.observe(won)  # it won: every member is paid its credit, not the best group's
    np.testing.assert_allclose(credit.totals, [1, 2, 3, 4, -1])
    lost = dataclasses.replace(won, consolidated=dataclasses.replace(c, won=False))
    credit.reset(5)
    credit.observe(lost)  # a group won: that group's credit, as without one
    assert credit.totals.tolist() == [0.0] * 5  # (this outcome carries no group credit)
