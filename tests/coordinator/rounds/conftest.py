"""Helpers shared by the executor tests: a coordinator with six contributors' data, the
tiny LM saved to a folder (as a Ray worker loads a base model), and a round runner over it."""

from __future__ import annotations

import pytest

from crowdsft.envelope import sign_contribution
from crowdsft.keys import Identity

TRAIN_SETTINGS = dict(
    rank=4,
    alpha=8,
    learning_rate=2e-2,
    epochs=3,
    batch_size=2,
    max_length=48,
    seed=1,
    target_modules=("q_proj", "v_proj"),
)
IDENTITIES = [Identity.generate() for _ in range(6)]
ANSWERS = ["yes yes yes", "yes yes", "no no no", "no", "yes no yes", "maybe yes"]


@pytest.fixture
def tiny_folder(tiny, tmp_path):
    model, tok = tiny
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def data_coordinator(make_coordinator):
    """``make(groups)``: a coordinator holding two examples from each of six nodes."""

    def make(groups=3):
        coord = make_coordinator(
            rounds={"groups": groups, "judging_error": 0.0, "consume": "none", "seed": 7},
            admission={"reject_duplicate_examples": False, "near_duplicate_threshold": 0.0},
        )
        with coord.client() as c:
            for ident, answer in zip(IDENTITIES, ANSWERS, strict=True):
                for prompt in ("say it", "again?"):
                    c.submit_one(
                        sign_contribution(
                            ident,
                            [{"prompt": prompt, "response": answer}],
                            coordinator=coord.public_key,
                        )
                    )
        return coord

    return make


@pytest.fixture
def round_runner(tiny_folder, char_embedder):
    """``make(coord, executor=None, device="cpu")``: a runner over the tiny LM loaded from
    its folder (on ``device``: "cuda" in bf16 where the card has it)."""
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.coordinator.training.space import GenerationConfig, LLMSpace
    from crowdsft.plugins.evaluation import L2

    def make(coord, executor=None, device="cpu"):
        model, tok = llm.load_base_model(str(tiny_folder), *llm.device_and_dtype(device))
        space = LLMSpace(
            model,
            tok,
            char_embedder,
            [],
            eval_prompts=[{"prompt": "say it"}, {"prompt": "again?"}],
            target_responses=["yes yes yes", "yes yes yes"],
            evaluation=L2(),
            training=llm.TrainingConfig(**TRAIN_SETTINGS),
            adapter_dir=coord.config.adapter_dir,
            generation=GenerationConfig(max_new_tokens=6, batch_size=2),
            credit_targets=[{"prompt": "say it", "response": "yes yes yes"}],
        )
        return RoundRunner(coord.config, coord.coordinator.store, space, executor=executor)

    return make
