"""Valuations grounded in fine-tuning, on a tiny random causal LM: the retraining game's
cache, exact Shapley values against a brute-force computation, efficiency, and truncated
Monte Carlo on it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from crowdsft.coordinator.training import lora as llm  # noqa: E402
from crowdsft.coordinator.training.space import GenerationConfig  # noqa: E402
from crowdsft.coordinator.training.valuation import RetrainingGame  # noqa: E402
from crowdsft.plugins.evaluation import L2  # noqa: E402
from crowdsft.plugins.valuation import (  # noqa: E402
    ExactShapley,
    MaxPermutations,
    PermutationShapley,
)

TRAIN = llm.TrainingConfig(
    rank=4, alpha=8, learning_rate=3e-2, epochs=4, batch_size=4, max_length=48, seed=0
)
YES = [{"prompt": p, "response": "yes yes yes"} for p in ("say yes", "agree?")]
NO = [{"prompt": p, "response": "no no no"} for p in ("say no", "refuse?")]


@pytest.fixture
def game(tiny, char_embedder):
    model, tok = tiny
    return RetrainingGame(
        model,
        tok,
        char_embedder,
        [YES, YES[:1], NO, NO[:1]],
        eval_prompts=[{"prompt": "say yes"}, {"prompt": "agree?"}],
        target_responses=["yes yes yes", "yes yes yes"],
        evaluation=L2(),
        training=TRAIN,
        generation=GenerationConfig(max_new_tokens=5, batch_size=2),
        seed=0,
    )


def _brute_force(values: dict[frozenset, float], n: int) -> np.ndarray:
    """Shapley values by their definition: each player's marginal contribution averaged over
    all n! orders."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        before: frozenset = frozenset()
        for j in order:
            phi[j] += values[before | {j}] - values[before]
            before = before | {j}
    return phi / math.factorial(n)


def test_a_coalition_is_fine_tuned_once_and_the_empty_one_never(game):
    masks = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0]], dtype=bool)
    first = game.values(masks)
    assert game.fits == 2  # {0, 2} and {1}; the empty coalition is the base model
    again = game.values(masks[::-1])
    assert game.fits == 2 and again.tolist() == first[::-1].tolist()
    assert first[0] == first[2]


def test_exact_retraining_shapley_matches_brute_force_and_is_efficient(game):
    result = ExactShapley()(game)
    assert game.fits == 2**4 - 1  # every non-empty coalition once
    every = {
        frozenset(s): float(game.values(np.isin(np.arange(4), list(s))[None, :])[0])
        for k in range(5)
        for s in itertools.combinations(range(4), k)
    }
    assert game.fits == 2**4 - 1  # all of those came from the cache
    np.testing.assert_allclose(result.values, _brute_force(every, 4), atol=1e-12)
    grand = every[frozenset(range(4))] - every[frozenset()]
    assert result.values.sum() == pytest.approx(grand, abs=1e-12)


def test_truncated_monte_carlo_on_the_retraining_game_shares_the_cache(game):
    exact = ExactShapley()(game)
    fits = game.fits
    tmc = PermutationShapley(MaxPermutations(24), batch=24, truncation=0.05, stratified=False)(
        game, np.random.default_rng(0)
    )
    assert game.fits == fits  # every coalition it asked for was already fine-tuned
    assert tmc.values.shape == exact.values.shape and np.all(np.isfinite(tmc.stderr))
