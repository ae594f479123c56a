"""The demo starts from nothing: a second run into the same folder replaces the first run's
coordinator, nodes and report, and nothing else."""

from __future__ import annotations

import pytest

from crowdsft.demo.run import _clear_previous_run
from crowdsft.errors import ConfigError


def test_a_previous_run_is_replaced_and_nothing_else(tmp_path):
    out = tmp_path / "demo"
    (out / "coordinator" / "data").mkdir(parents=True)
    (out / "coordinator" / "coordinator.toml").write_text("")
    (out / "nodes" / "expert-like-1").mkdir(parents=True)
    (out / "report").mkdir()
    (out / "notes.txt").write_text("mine")
    said: list[str] = []
    _clear_previous_run(out, said.append)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert said and "replacing the previous run" in said[0]
    _clear_previous_run(out, said.append)  # nothing left to replace: silent
    assert len(said) == 1


def test_a_folder_that_is_not_a_demo_is_left_alone(tmp_path):
    (tmp_path / "coordinator").mkdir()
    (tmp_path / "coordinator" / "precious.sqlite3").write_text("x")
    with pytest.raises(ConfigError, match="not a demo's coordinator"):
        _clear_previous_run(tmp_path, lambda s: None)
    assert (tmp_path / "coordinator" / "precious.sqlite3").exists()


def test_the_demo_configures_a_fresh_coordinator_folder(tmp_path):
    """The demo's settings land in the coordinator.toml that `coordinator init` writes (fast:
    the run itself is a slow test), and the file keeps its comments."""
    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.server.scaffold import init_coordinator
    from crowdsft.demo.run import DemoSettings, _configure

    path = init_coordinator(tmp_path / "c", listen="127.0.0.1:0", force=True)
    s = DemoSettings(seed=4, reward="credit")
    _configure(path, s)
    c = load_coordinator_config(path)
    assert c.server.listen == "127.0.0.1:0"
    assert (c.training.layers, c.training.max_steps, c.training.batch_size) == (
        s.layers,
        s.steps,
        s.batch_size,
    )
    assert c.training.max_length == 96 and c.training.epochs == 100
    assert c.evaluation.batch_size == 8  # the other batch_size is untouched
    assert (c.rounds.groups, c.rounds.reward, c.rounds.seed) == (s.groups, "credit", 4)
    assert c.evaluation.target_file is not None and c.evaluation.target_file.name == "target.jsonl"
    assert "# Who trains a round's candidates" in path.read_text()
