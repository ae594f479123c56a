"""The paper's LLM experiment: its data, the held-out split, the tournament's bookkeeping,
determinism, and the commands (on a tiny random model)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.errors import ConfigError
from crowdsft.experiment import data as paper_data
from crowdsft.experiment.paper_llm import PaperExperiment, PaperSettings, split

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "paper-llm"


@pytest.fixture(scope="module")
def records():
    if not DATA.is_dir():
        pytest.skip("shared/data/paper-llm is not here")
    return paper_data.load(DATA)


class CharEmbedder:
    def embed(self, texts):
        out = np.zeros((len(texts), 28))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 28] += 1
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(n > 0, n, 1)


def test_pool_and_centroid_reproduce_the_papers_joy_single_100(records):
    pool = records.pool("joy")
    assert [p.rank for p in pool] == list(range(1, 101))  # the seed comment is left out
    vectors = [o.vector for o in records.outputs_of("joy", "single-100")]
    assert len(vectors) == 50
    assert paper_data.mean_distance(vectors, records.centroid("joy")) == pytest.approx(
        0.7408, abs=5e-5
    )


def test_targets_are_chosen_the_same_way_and_checked(records):
    assert len(records.targets) == 28
    assert paper_data.select_targets(records, 3) == paper_data.select_targets(records, "3")
    assert paper_data.select_targets(records, "joy,anger") == ["joy", "anger"]
    with pytest.raises(ConfigError, match="unknown target"):
        paper_data.select_targets(records, "joy,glee")


def test_held_out_answers_are_never_in_the_fit_set(records):
    texts, vectors, kept_out = paper_data.split_texts(records)
    assert len(texts) == len(vectors)
    fitted = {paper_data._text_key(t) for t in texts}
    assert kept_out and not any(paper_data._text_key(o.text) in fitted for o in kept_out)
    models = {(o.target, o.model) for o in records.outputs}
    assert {(o.target, o.model) for o in kept_out} == models  # every model has some


def test_split_is_balanced():
    parts = split(list(range(67)), 3)
    assert [len(p) for p in parts] == [23, 22, 22]
    assert [i for p in parts for i in p] == list(range(67))


def _run(records, tiny_lm, seed=0, log=None):
    model, tokenizer = tiny_lm
    settings = PaperSettings(answers=3, max_new_tokens=6, epochs=1, batch_size=16)
    exp = PaperExperiment(
        records,
        model,
        tokenizer,
        CharEmbedder(),
        settings,
        say=lambda s: None,
        on_answers=(lambda *a: log.append(a)) if log is not None else None,
    )
    return exp.run_one("joy", seed), exp


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("peft")
    from crowdsft.testing.tiny import tiny_model

    return tiny_model()


def test_selection_and_reporting_use_separate_answers(records, tiny_lm):
    log: list = []
    row, _ = _run(records, tiny_lm, log=log)
    selection = [a for a in log if a[0] == "selection"]
    reported = [a for a in log if a[0] == "reported"]
    assert len(selection) == 9 and len(reported) == 3 + 3  # 3 singles, one winner a generation
    assert not {a[2] for a in selection} & {a[2] for a in reported}  # no sampling seed shared
    target = CharEmbedder().embed([p.text for p in records.pool("joy")]).mean(axis=0)
    for gen in row["generations"]:
        dists = gen["selection_distances"]
        assert gen["winner"] == int(np.argmin(dists)) + 1
        assert gen["same_sample_distance"] == min(dists)
        # the reported distance is computed from the reported answers, and from them only
        name = f"multi-g{gen['generation']}-c{gen['winner']}"
        [answers] = [a[3] for a in reported if a[1] == name]
        assert gen["distance"] == pytest.approx(
            paper_data.mean_distance(CharEmbedder().embed(answers), target)
        )
    assert row["multi"] == [g["distance"] for g in row["generations"]]
    assert row["multi_same_sample"] == [g["same_sample_distance"] for g in row["generations"]]


def test_segments_are_disjoint_retired_and_reshuffled(records, tiny_lm):
    row, _ = _run(records, tiny_lm)
    gens = row["generations"]
    first = [r for seg in gens[0]["segments"] for r in seg]
    assert sorted(first) == list(range(1, 101))
    for prev, nxt in itertools.pairwise(gens):
        won = set(prev["segments"][prev["winner"] - 1])
        left = {r for seg in prev["segments"] for r in seg} - won
        now = [r for seg in nxt["segments"] for r in seg]
        assert len(now) == len(set(now)) and set(now) == left
        assert max(map(len, nxt["segments"])) - min(map(len, nxt["segments"])) <= 1
        # reshuffled: not just the leftover segments again
        assert sorted(map(sorted, nxt["segments"])) != sorted(
            sorted(s) for i, s in enumerate(prev["segments"]) if i != prev["winner"] - 1
        )


def test_a_fixed_seed_gives_the_same_result(records, tiny_lm):
    a, _ = _run(records, tiny_lm, seed=1)
    b, _ = _run(records, tiny_lm, seed=1)
    c, _ = _run(records, tiny_lm, seed=2)
    for key in ("single_33", "single_66", "single_100", "multi", "generations"):
        assert a[key] == b[key]
    assert a["generations"][0]["segments"] != c["generations"][0]["segments"]


@pytest.mark.slow
def test_quick_command_runs_three_targets_with_the_goemotions_embedder(records, tmp_path):
    out = tmp_path / "rows.jsonl"
    res = CliRunner().invoke(
        main,
        ["experiment", "paper-llm", "--data", str(DATA), "--quick", "--json", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["held_out"] is True and result["embedder"] == "goemotions"
    assert len(result["targets"]) == 3 and len(out.read_text().splitlines()) == 3
    for row in result["targets"]:
        assert {"target", "seed", "single_33", "single_66", "single_100"} <= row.keys()
        assert len(row["multi"]) == 3 and len(row["multi_same_sample"]) == 3
        assert isinstance(row["reduction_percent"], float)
    for key in ("mean_reduction_percent", "ci95_percent", "seconds"):
        assert key in result

    # --resume reuses the rows of a run with the same key and runs nothing again...
    args = ["experiment", "paper-llm", "--data", str(DATA), "--quick", "--json", "--out", str(out)]
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.stdout)
    assert resumed["resumed"] == 3 and resumed["targets"] == result["targets"]
    assert len(out.read_text().splitlines()) == 3
    # ...but not those of a run with other settings.
    other = CliRunner().invoke(main, [*args, "--resume", "--answers", "3", "--targets", "joy"])
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout)["resumed"] == 0
    assert len(out.read_text().splitlines()) == 4


def test_resume_needs_an_out_file(tmp_path):
    res = CliRunner().invoke(
        main, ["experiment", "paper-llm", "--data", str(tmp_path), "--quick", "--resume"]
    )
    assert res.exit_code != 0 and "--resume needs --out" in res.output


def test_a_wrong_data_folder_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["experiment", "paper-llm", "--data", str(tmp_path)])
    assert res.exit_code != 0 and "missing labels.json" in res.output
