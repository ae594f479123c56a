"""Operating a round without surprises: `coordinator init` writes an example target and says
what a round needs; `coordinator round` checks every precondition before any model loads,
naming the setting to change."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.datafiles import read_records


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the preconditions were checked")

    import crowdsft.coordinator.training.space as space

    monkeypatch.setattr(space, "build_llm_space", refuse)


def test_init_writes_an_example_target_and_says_what_a_round_needs(tmp_path):
    out = CliRunner().invoke(main, ["coordinator", "init", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    example = tmp_path / "c" / "target.example.jsonl"
    assert len(read_records(example)) == 3  # a valid target file
    assert "a round needs:" in out.output and "evaluation.target_file" in out.output
    assert "rounds.groups = 3" in out.output


def test_round_refuses_before_loading_a_model_and_names_the_setting(tmp_path, no_model_loading):
    runner = CliRunner()
    assert runner.invoke(main, ["coordinator", "init", str(tmp_path / "c")]).exit_code == 0
    config = tmp_path / "c" / "coordinator.toml"
    out = runner.invoke(main, ["coordinator", "round", "--config", str(config)])
    assert out.exit_code != 0
    assert "no target: set evaluation.target_file" in out.output
    assert (
        "rounds.groups = 3 groups needs 3 contributors" in out.output
        and "there are 0" in out.output
    )
    # with the example as the target, only the contributors are missing
    text = config.read_text().replace(
        '# target_file = "target.jsonl"', 'target_file = "target.example.jsonl"'
    )
    config.write_text(text)
    out = runner.invoke(main, ["coordinator", "round", "--config", str(config)])
    assert out.exit_code != 0 and "no target" not in out.output
    assert "lower rounds.groups" in out.output
    # a broken target file is named with its line
    (tmp_path / "c" / "target.example.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    out = runner.invoke(main, ["coordinator", "round", "--config", str(config)])
    assert "evaluation.target_file" in out.output and "line 1" in out.output


def test_round_redecide_is_checked_before_a_model_loads(tmp_path, no_model_loading):
    runner = CliRunner()
    assert runner.invoke(main, ["coordinator", "init", str(tmp_path / "c")]).exit_code == 0
    config = tmp_path / "c" / "coordinator.toml"
    config.write_text(
        config.read_text().replace(
            '# target_file = "target.jsonl"', 'target_file = "target.example.jsonl"'
        )
    )
    out = runner.invoke(main, ["coordinator", "round", "--config", str(config), "--redecide"])
    assert out.exit_code == 2
    assert "--redecide: there is no unfinished round to decide again" in out.output
    assert "--redecide" in runner.invoke(main, ["coordinator", "round", "--help"]).output
