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
