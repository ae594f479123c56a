"""The crowd experiment: who is in the crowd, the AUC, every rule's points replayed from the
ledger, and the command end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.experiment import crowd
from crowdsft.experiment import data as paper_data

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "paper-llm"


@pytest.fixture(scope="module")
def records():
    if not DATA.is_dir():
        pytest.skip("shared/data/paper-llm is not here")
    return paper_data.load(DATA)


def test_bad_contributors_make_the_fraction_asked_for():
    assert [crowd.n_bad(10, f) for f in (0.0, 0.3, 0.5)] == [0, 4, 10]
    with pytest.raises(ValueError):
        crowd.n_bad(10, 1.0)


def test_the_crowd_honest_from_the_pool_bad_from_the_far_pools_nested(records):
    far = ["gratitude", "amusement", "love"]
    big = crowd.make_crowd(records, "joy", 0, 10, far)
    small = crowd.make_crowd(records, "joy", 0, 4, far)
    pool = {p.text for p in records.pool("joy")}
    honest = [m for m in big if m.honest]
    bad = [m for m in big if not m.honest]
    assert len(honest) == 10 and all(len(m.examples) == 10 for m in big)  # joy: 100 distinct
    assert {e["response"] for m in honest for e in m.examples} == pool  # the whole pool, once
    assert sum(len(m.examples) for m in honest) == len(pool)
    assert [m.source for m in bad] == [far[b % 3] for b in range(10)]  # spread over the pools
    assert not {e["response"] for m in bad for e in m.examples} & pool
    for m in bad:
        source = {p.text for p in records.pool(m.source)}
        assert {e["response"] for e in m.examples} <= source
    assert small == big[:14]  # a smaller fraction's bad contributors are the first ones
    assert crowd.make_crowd(records, "joy", 1, 4, far) != small  # another seed, another deal


def test_far_emotions_are_the_farthest_centroids():
    centroids = {
        "a": np.zeros(2),
        "b": np.array([1.0, 0]),
        "c": np.array([3.0, 0]),
        "d": -np.ones(2),
    }
    assert crowd.far_emotions(centroids, "a", 2) == ["c", "d"]


def test_auc_is_the_chance_that_honest_beats_bad():
    assert crowd.auc([3, 4], [1, 2]) == 1.0
    assert crowd.auc([1, 2], [3, 4]) == 0.0
    assert crowd.auc([1, 2], [1, 2]) == 0.5
    assert crowd.auc([2, 2], [1, 3]) == 0.5
    assert crowd.auc([1.0], []) is None


def test_every_rules_points_replayed_from_the_ledger_are_the_coordinators(make_coordinator):
    """Under the rule a coordinator ran, the points replayed from its records are the points
    it awarded; the other rules' come from the same rounds."""
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.coordinator.store.chain import ledger_entries
    from crowdsft.envelope import sign_contribution
    from crowdsft.keys import Identity
    from crowdsft.plugins.manager import get_plugins
    from crowdsft.testing.standin import StandInSpace

    for rule in ("rank", "regression"):
        coord = make_coordinator(
            rounds={"groups": 2, "reward": rule, "consolidate_every": 2, "consume": "none"},
            admission={"near_duplicate_threshold": 0.0},
        )
        nodes = [Identity.generate() for _ in range(6)]
        with coord.client() as c:
            for k, ident in enumerate(nodes):
                for j in range(2):
                    words = " ".join(["word"] * (2 + 4 * k + j))
                    c.submit_one(
                        sign_contribution(
                            ident,
                            [{"prompt": f"q{k}.{j}", "response": words}],
                            coordinator=coord.public_key,
                        )
                    )
        runner = RoundRunner(
            coord.config, coord.coordinator.store, StandInSpace(coord.config.adapter_dir)
        )
        for _ in range(3):
            runner.run()
        records = [json.loads(e.record) for e in ledger_entries(coord.coordinator.store)]
        assert any("consolidated" in r for r in records)
        by_rule = crowd.points_by_rule(records, {}, get_plugins())
        held = runner.points()
        assert by_rule[rule] == pytest.approx({n: 1.0 + held.get(n, 0.0) for n in by_rule[rule]})
        assert by_rule["credit"] is None  # the stand-in records no in-run credit
        other = "regression" if rule == "rank" else "rank"
        assert by_rule[other] is not None and set(by_rule[other]) == set(by_rule[rule])


def test_the_crowd_command_on_a_tiny_model_resumes_from_its_rows(records, tmp_path):
    out = tmp_path / "rows.jsonl"
    args = [
        "experiment", "crowd", "--data", str(DATA), "--quick", "--targets", "joy",
        "--seeds", "1", "--bad-fractions", "0,0.3", "--rounds", "2",
        "--consolidate-every", "1", "--out", str(out), "--json",
    ]  # fmt: skip
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    rows = result["targets"]
    assert [(r["target"], r["seed"], r["bad_fraction"]) for r in rows] == [
        ("joy", 0, 0.0),
        ("joy", 0, 0.3),
    ]
    for r in rows:
        for key in ("single_all", "single_clean", "tournament", "reduction_percent", "base"):
            assert isinstance(r[key], float)
        assert set(r["auc"]) == {"rank", "regression", "credit"}
        assert r["reduction_percent"] == pytest.approx(
            100 * (r["single_all"] - r["tournament"]) / r["single_all"]
        )
    for r in rows:
        for arm in ("base", "single_all", "single_clean", "tournament"):
            stats = r["answers"][arm]
            assert stats["spread"] >= 0 and 0 < stats["distinct"] <= 1
        assert r["target_spread"] > 0
        # single-all again, with exactly the lineage's optimizer steps (selection against
        # training longer), where some round updated the model
        assert r["single_all_steps"] > 0 and r["lineage_steps"] >= 0
        if any(rd["updated"] for rd in r["rounds"]):
            assert r["lineage_steps"] > 0 and isinstance(r["single_all_matched"], float)
        else:
            assert r["lineage_steps"] == 0 and r["single_all_matched"] is None
        # the product's default: real rounds are decided by their measured scores, unswapped
        assert r["judging_error"] == 0.0 and not any(rd["swapped"] for rd in r["rounds"])
    clean, dirty = rows
    assert clean["bad"] == 0 and clean["single_all"] == clean["single_clean"]
    assert all(v is None for v in clean["auc"].values())  # nobody bad to tell apart
    assert dirty["bad"] == 2 and dirty["single_clean"] == clean["single_clean"]
    assert dirty["examples"] > clean["examples"]
    assert all(v is not None and 0 <= v <= 1 for v in dirty["auc"].values())
    assert any(r["winner"] == "consolidated" or r["winner"] is None or isinstance(r["winner"], int)
               for r in dirty["rounds"])  # fmt: skip
    assert result["held_out"] is True and set(result["mean_reduction_percent"]) == {"0", "0.3"}
    assert len(out.read_text().splitlines()) == 2
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed"] == 2
    assert json.loads(again.stdout)["targets"] == rows
    assert len(out.read_text().splitlines()) == 2  # nothing run, nothing appended


def test_bad_fractions_are_checked_before_any_work(records):
    bad = CliRunner().invoke(
        main, ["experiment", "crowd", "--data", str(DATA), "--bad-fractions", "0,1"]
    )
    assert bad.exit_code == 2 and "[0, 1)" in bad.output
    unknown = CliRunner().invoke(
        main, ["experiment", "crowd", "--data", str(DATA), "--quick", "--reward", "rnak"]
    )
    assert unknown.exit_code != 0 and "rnak" in unknown.output


@pytest.mark.parametrize(
    ("steps", "n", "epochs"), [(10, 7, 5), (7, 7, 4), (3, 100, 1), (75, 100, 3)]
)
def test_the_matched_arm_trains_exactly_the_lineages_steps(steps, n, epochs):
    """As many epochs as the steps need over ``n`` examples, cut at the step count."""
    from crowdsft.experiment.crowd import CrowdExperiment, CrowdSettings

    experiment = object.__new__(CrowdExperiment)
    experiment.settings = CrowdSettings(batch_size=4)
    config = experiment._training(0, steps, n)
    assert config.max_steps == steps and config.epochs == epochs
    per_epoch = -(-n // 4)
    assert config.epochs_for(n) * per_epoch >= steps > (config.epochs_for(n) - 1) * per_epoch
    assert experiment._training(0).epochs == "auto" and experiment._training(0).max_steps is None


@pytest.fixture(scope="module")
def tiny_experiment(records):
    """A crowd experiment on the tiny random model and the trigram embedder (as --quick)."""
    import dataclasses

    from crowdsft.testing.standin import TrigramEmbedder
    from crowdsft.testing.tiny import tiny_model

    model, tokenizer = tiny_model()
    settings = dataclasses.replace(
        crowd.CrowdSettings(),
        answers=4,
        max_new_tokens=8,
        per_contributor=25,
        rounds=2,
        credit_targets=0,
        consolidate_every=1,
    )
    embedder = TrigramEmbedder()
    return crowd.CrowdExperiment(
        records, model, tokenizer, embedder, embedder, settings, say=lambda s: None
    )


def test_a_rows_matched_arm_is_recovered_from_its_recorded_rounds(tiny_experiment):
    """Rows from before the matched arm get it from a replay of their rounds with the
    recorded scores: the replay gives the steps the row recorded, and the arm the very
    distance the full row computed."""
    (row,) = tiny_experiment.run_target_seed("joy", 0, [0.3])
    assert any(r["updated"] for r in row["rounds"]) and row["lineage_steps"] > 0
    old = {k: v for k, v in row.items() if k not in ("single_all_matched", "lineage_steps")}
    got = tiny_experiment.matched_arm(old)
    assert got["lineage_steps"] == row["lineage_steps"]
    assert got["single_all_steps"] == row["single_all_steps"]
    assert got["single_all_matched"] == row["single_all_matched"]  # exactly
    # a row whose recorded steps the replay does not give is refused
    with pytest.raises(ValueError, match="lineage steps"):
        tiny_experiment.replay(row | {"lineage_steps": row["lineage_steps"] + 1})
    # a row whose recorded winner is not the candidate its scores make win is refused
    tampered = json.loads(json.dumps(row))
    first = tampered["rounds"][0]
    if first["updated"]:
        first["distances"] = [first["base_distance"] + 1.0] * len(first["distances"])
    else:
        first["distances"] = [first["base_distance"] - 1.0] * len(first["distances"])
    with pytest.raises(ValueError, match="round 1: replayed"):
        tiny_experiment.replay(tampered)
    # points that the replayed groups and rankings do not give (other members) are refused
    other = json.loads(json.dumps(row))
    other["points"]["rank"]["honest"] += 0.5
    with pytest.raises(ValueError, match="rank points"):
        tiny_experiment.replay(other)
    # and so is a row decided under another reward rule
    with pytest.raises(ValueError, match="reward"):
        tiny_experiment.replay(row | {"reward": "regression"})


def test_the_replayed_space_counts_steps_and_gives_each_candidate_its_recorded_score():
    """``Replayed`` maps the k-th candidate proposed in round r to the row's r-th round's
    k-th distance (the consolidated one last), the starting model to the round's base
    distance, and counts steps as training does: the epoch rule over the job's examples, in
    batches, capped at ``max_steps``."""
    from types import SimpleNamespace

    from crowdsft.config import TrainingConfig
    from crowdsft.coordinator.training.space import Candidate

    class Inner:
        def __init__(self, training):
            self.training = training

        def set_data(self, data):
            self.data = data

        def job(self, members, weights, rng):
            examples = [ex for m in members for ex in self.data[int(m)]]
            return SimpleNamespace(examples=examples, training=self.training)

    rounds = [
        {"base_distance": 1.0, "distances": [0.9, 0.7, 0.8, 0.6]},
        {"base_distance": 0.6, "distances": [0.65, 0.61]},
    ]
    one = [{"prompt": "p", "response": "r"}]
    space = crowd.Replayed(Inner(TrainingConfig(epochs="auto", batch_size=4)), rounds)
    space.set_data([one * 10, one * 10, one * 25, one * 7])
    assert space.n_contributors == 4
    space.begin_round(1)
    base = Candidate(("a",))
    made = [
        space.propose(base, np.array(m), np.ones(len(m)), None)
        for m in ([0], [1, 2], [3], [0, 1, 2, 3])
    ]
    # 10 examples: 10 epochs (the rule's min(25, 100 // n) below 34) of 3 batches; 35: 3 x 9;
    # 7: 14 x 2; 52: 3 x 13
    assert [space.training_info(c.adapter)["steps"] for c in made] == [30, 27, 28, 39]
    assert all(c.chain == base.lineage for c in made)
    assert list(space.score([base, *made])) == [-1.0, -0.9, -0.7, -0.8, -0.6]
    space.begin_round(2)
    later = [space.propose(base, np.array([3]), np.ones(1), None) for _ in range(2)]
    assert list(space.score([Candidate(("b",)), *later, made[1]])) == [-0.6, -0.65, -0.61, -0.7]
    capped = crowd.Replayed(Inner(TrainingConfig(epochs="auto", batch_size=4, max_steps=5)), rounds)
    capped.set_data([one * 10])
    capped.begin_round(1)
    c = capped.propose(base, np.array([0]), np.ones(1), None)
    assert capped.training_info(c.adapter)["steps"] == 5
    with pytest.raises(ValueError, match="not among"):
        capped.begin_round(3)
