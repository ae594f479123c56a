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


def test_truncated_monte_carlo_fine_tunes_fewer_coalitions_and_shares_the_cache(game):
    # a wide tolerance, so that permutations are cut early on this small noisy game
    tmc = PermutationShapley(MaxPermutations(6), batch=6, truncation=0.5, stratified=False)
    result = tmc(game, np.random.default_rng(0))
    assert 0 < game.fits < 2**4 - 1  # not every coalition was fine-tuned
    assert np.all(np.isfinite(result.values)) and np.all(np.isfinite(result.stderr))
    fits = game.fits
    ExactShapley()(game)  # exact on the same game reuses what TMC fine-tuned
    assert game.fits == 2**4 - 1 and fits < game.fits


# -- in-run credit -------------------------------------------------------------------------

TARGET = [{"prompt": "say yes", "response": "yes yes yes"}]


def _brute_force_first_step(model, tok, examples, weights, config):
    """lr * (w_i / W) * <grad L_i, grad L_target> at the adapter's initial weights, from each
    example's own gradient (the slow way the ghost inner products avoid)."""
    from peft import get_peft_model

    llm.seed_everything(config.seed)
    peft = get_peft_model(model, llm.lora_config(config, model))
    try:
        params = [p for p in peft.parameters() if p.requires_grad]

        def grad(rows):
            b = llm.encode(tok, rows, None, config.max_length)
            out = peft(input_ids=b.input_ids, attention_mask=b.attention_mask)
            loss = llm.weighted_loss(out.logits, b.labels, b.weights)
            return torch.autograd.grad(loss, params, allow_unused=True)

        def dot(a, b):
            return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True) if x is not None)

        target = grad(TARGET)
        share = np.asarray(weights) / np.sum(weights)
        return np.array(
            [
                config.learning_rate * s * dot(grad([e]), target)
                for e, s in zip(examples, share, strict=True)
            ]
        )
    finally:
        peft.unload()


@pytest.mark.parametrize(
    ("pack", "layers"), [(False, None), (True, None), (True, 1)], ids=["padded", "packed", "front"]
)
def test_in_run_credit_equals_per_example_gradients_on_the_first_step(
    tiny, monkeypatch, pack, layers
):
    """The same credit from a padded batch, from a packed row, and from a packed row fed to
    the trained layers only (LoRA on the last layer: the first runs once per fit)."""
    from crowdsft.coordinator.training.valuation import InRunCredit

    model, tok = tiny
    plain_config = llm.lora_config

    def random_b(config, model):  # LoRA's B starts at zero by default: then A gets no gradient
        c = plain_config(config, model)
        c.init_lora_weights = False
        return c

    monkeypatch.setattr(llm, "lora_config", random_b)
    examples = [YES[0], NO[0], {"prompt": "hello there", "response": "the cat sat on the mat"}]
    weights = [1.0, 2.0, 0.5]
    config = llm.TrainingConfig(
        rank=4,
        alpha=8,
        learning_rate=1e-2,
        batch_size=3,
        max_length=48,
        max_steps=1,
        seed=3,
        target_modules=("q_proj", "v_proj", "o_proj"),
        layers=layers,
    )
    credit = InRunCredit(TARGET)
    llm.fit(model, tok, examples, weights, config, credit=credit, pack=pack)
    # credits are kept per example index, whatever the order within the batch
    expected = _brute_force_first_step(model, tok, examples, weights, config)
    assert np.all(np.abs(expected) > 1e-9)  # A and B both carry gradient here
    np.testing.assert_allclose(credit.credit, expected, rtol=1e-4, atol=1e-10)
    assert credit.steps == 1 and credit.seconds > 0


def test_in_run_credit_over_a_whole_fit_is_the_same_packed_or_padded(tiny):
    from crowdsft.coordinator.training.valuation import InRunCredit

    model, tok = tiny
    examples = [*YES, *NO, {"prompt": "hello there", "response": "the cat sat on the mat"}]
    config = llm.TrainingConfig(
        rank=4, alpha=8, learning_rate=1e-2, epochs=2, batch_size=2, max_length=48, seed=0
    )
    runs = []
    for pack in (False, True):
        credit = InRunCredit(TARGET, also=[NO[:1]])
        fit = llm.fit(model, tok, examples, None, config, credit=credit, pack=pack)
        runs.append((credit, fit))
    (padded, a), (packed, b) = runs
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    for x, y in zip(padded.credits, packed.credits, strict=True):
        np.testing.assert_allclose(y, x, rtol=2e-3, atol=1e-9)


def test_in_run_credit_is_zero_without_gradient_and_positive_for_the_target(tiny):
    from crowdsft.coordinator.training.valuation import InRunCredit, credit_by_owner

    model, tok = tiny
    cut = {"prompt": " ".join(["a b c d"] * 30), "response": "yes"}  # response cut away
    examples = [TARGET[0], cut, NO[0]]
    config = llm.TrainingConfig(
        rank=4, alpha=8, learning_rate=1e-2, epochs=3, batch_size=2, max_length=32, seed=0
    )
    credit = InRunCredit(TARGET)
    llm.fit(model, tok, examples, None, config, credit=credit)
    assert credit.credit[0] > 0  # the target itself
    assert credit.credit[1] == 0.0  # no response token left: no gradient, no credit
    assert credit.steps == 3 * 2
    per_owner = credit_by_owner(credit.credit, [0, 1, 1], 2)
    assert per_owner.tolist() == [credit.credit[0], credit.credit[1] + credit.credit[2]]


def test_in_run_credit_against_further_target_sets_matches_separate_runs(tiny):
    """One run credited against two target sets gives, for each, what a run credited
    against that set alone gives (the same seed, the same training)."""
    from crowdsft.coordinator.training.valuation import InRunCredit

    model, tok = tiny
    other = [{"prompt": "say no", "response": "no no no"}]
    examples = [TARGET[0], NO[0], YES[0]]
    config = llm.TrainingConfig(
        rank=4, alpha=8, learning_rate=1e-2, epochs=2, batch_size=2, max_length=32, seed=0
    )
    both = InRunCredit(TARGET, also=[other])
    llm.fit(model, tok, examples, None, config, credit=both)
    alone = []
    for target in (TARGET, other):
        single = InRunCredit(target)
        llm.fit(model, tok, examples, None, config, credit=single)
        alone.append(single.credit)
    np.testing.assert_allclose(both.credit, alone[0], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(both.also_credit[0], alone[1], rtol=1e-5, atol=1e-12)
    assert both.credit[1] != pytest.approx(both.also_credit[0][1])  # the sets differ
    with pytest.raises(ValueError, match="target example"):
        InRunCredit(TARGET, also=[[]])
    # a target set whose responses are all cut away would credit 0 everywhere: refused
    long_prompt = [{"prompt": " ".join(["a b c d"] * 30), "response": "yes"}]
    with pytest.raises(ValueError, match="no response token"):
        llm.fit(model, tok, examples, None, config, credit=InRunCredit(TARGET, also=[long_prompt]))


def test_the_llm_space_records_each_members_in_run_credit(tiny, char_embedder, tmp_path):
    from crowdsft.coordinator.rounds.space import Candidate
    from crowdsft.coordinator.training.space import LLMSpace

    model, tok = tiny
    space = LLMSpace(
        model,
        tok,
        char_embedder,
        [YES, NO, YES[:1]],
        eval_prompts=[{"prompt": "say yes"}],
        target_responses=["yes yes yes"],
        evaluation=L2(),
        training=TRAIN,
        adapter_dir=tmp_path,
        generation=GenerationConfig(max_new_tokens=4, batch_size=2),
        credit_targets=TARGET,
        heldout_credit_targets=[{"prompt": "answer", "response": "no no"}],
    )
    cand = space.propose(Candidate(), np.array([2, 0, 1]), np.ones(3), np.random.default_rng(0))
    info = space.training_info(cand.adapter)
    credit = info["member_credit"]
    assert len(credit) == 3 and all(np.isfinite(credit))  # one per member, in members order
    assert credit[0] > 0 and credit[1] > 0  # the members whose data is the target's answer
    assert info["credit_seconds"] >= 0
    heldout = info["member_credit_heldout"]  # the same training, against the held-out set
    assert len(heldout) == 3 and heldout != credit


def test_the_coordinator_config_credits_against_held_out_prompts(
    make_coordinator, tiny, char_embedder, monkeypatch, tmp_path
):
    """``[valuation] heldout_file`` gives the space held-out credit targets; it needs in-run
    credit on (or a reward that pays from it)."""
    import dataclasses
    import json

    from crowdsft.coordinator.training.space import build_llm_space
    from crowdsft.errors import ConfigError
    from crowdsft.plugins.manager import get_plugins

    monkeypatch.setattr(llm, "load_base_model", lambda *a, **k: tiny)
    real = get_plugins()

    class Plugins:
        def get(self, kind, name):
            return real.get(kind, name)

        def create(self, kind, name, **kw):
            return char_embedder if kind == "embedder" else real.create(kind, name, **kw)

    target, heldout = tmp_path / "target.jsonl", tmp_path / "heldout.jsonl"
    target.write_text(json.dumps(TARGET[0]) + "\n")
    heldout.write_text(json.dumps({"prompt": "answer", "response": "no no"}) + "\n")
    base = make_coordinator().config
    config = dataclasses.replace(
        base,
        evaluation=dataclasses.replace(base.evaluation, target_file=target),
        valuation=dataclasses.replace(base.valuation, heldout_file=heldout, in_run=True),
    )
    space = build_llm_space(config, Plugins())
    assert space.records_credit and space.credit_targets == TARGET
    assert space.heldout_credit_targets == [{"prompt": "answer", "response": "no no"}]
    off = dataclasses.replace(config, valuation=dataclasses.replace(config.valuation, in_run=False))
    with pytest.raises(ConfigError, match="in_run"):
        build_llm_space(off, Plugins())
    # the credit reward turns in-run credit on by itself
    paying = dataclasses.replace(off, rounds=dataclasses.replace(off.rounds, reward="credit"))
    assert build_llm_space(paying, Plugins()).heldout_credit_targets is not None
