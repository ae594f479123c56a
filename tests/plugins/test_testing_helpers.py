"""The helpers plugin authors test with (``crowdsft.plugins.testing``), and the testing
example of docs/plugins.md, run as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from crowdsft.plugins.hookspecs import hookimpl
from crowdsft.plugins.reward import RankReward
from crowdsft.plugins.testing import make_outcome, registered, replay

ROOT = Path(__file__).resolve().parents[2]


def test_make_outcome_builds_what_the_engine_builds_and_checks_it():
    o = make_outcome([[0, 2], [1]], [0.5, 0.9], base_score=0.1)
    assert o.order.tolist() == [1, 0] and [w.tolist() for w in o.weights] == [[1, 1], [1]]
    assert make_outcome([[0], [1]], [0.2, 0.1], order=[]).order.size == 0  # guard kept the model
    with pytest.raises(ValueError, match="exactly once"):
        make_outcome([[0, 1], [1]], [0.1, 0.2])
    with pytest.raises(ValueError, match="one score per group"):
        make_outcome([[0], [1]], [0.1])
    with pytest.raises(ValueError, match="order must list every group"):
        make_outcome([[0], [1]], [0.1, 0.2], order=[0, 0])


def test_replay_runs_a_rule_as_the_coordinator_does():
    rounds = [
        make_outcome([[0, 1], [2, 3]], [0.9, 0.1]),  # group 0 wins: +2 each, group 1: +1 each
        make_outcome([[0, 2], [1, 3]], [0.1, 0.2], order=[]),  # kept the model: no change
    ]
    assert replay(RankReward(), rounds, 4).tolist() == [3.0, 3.0, 2.0, 2.0]


def test_registered_refuses_a_sloppy_plugin():
    class Sloppy:
        @hookimpl
        def crowdsft_register_rewards(self, register):  # misspelled: never called
            register("x", RankReward)

    with (
        pytest.raises(AssertionError, match="did you mean crowdsft_register_reward"),
        registered(Sloppy(), name="sloppy"),
    ):
        pass


def test_the_testing_example_in_the_docs_runs(monkeypatch):
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("## Testing a plugin") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "docs/plugins.md: no python example under 'Testing a plugin'"
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "crowdsft-example-reward"))
    sys.modules.pop("crowdsft_example_reward", None)
    namespace: dict = {}
    exec(compile(code.group(1), "docs/plugins.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests, "the example defines no test"
    for test in tests:
        test()
    assert np is not None
