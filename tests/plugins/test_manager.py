"""The plugin manager: built-ins, third-party plugins through the entry point, blocking,
the validation and round hooks, and a meta-test that every hookspec is tested."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from crowdsft import hookimpl
from crowdsft.cli import main
from crowdsft.plugins import hookspecs
from crowdsft.plugins.manager import KINDS, PluginError, Plugins, create_plugin_manager, get_plugins

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "crowdsft-example-reward"


@pytest.fixture
def fresh_plugins():
    """A fresh process-wide plugin manager for the test, and a clean one after it."""
    get_plugins.cache_clear()
    yield get_plugins
    get_plugins.cache_clear()


@pytest.fixture
def example_installed(tmp_path, monkeypatch, fresh_plugins):
    """Make the example package importable and visible as an installed distribution with
    its entry point, exactly as ``pip install`` would (a dist-info on sys.path)."""
    site = tmp_path / "site"
    info = site / "crowdsft_example_reward-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crowdsft-example-reward\nVersion: 0.1.0\n"
    )
    ep = re.search(
        r"\[project\.entry-points\.crowdsft\]\n(.+?)\n", (EXAMPLE / "pyproject.toml").read_text()
    )
    line = ep.group(1).replace('"', "")  # TOML string -> entry_points.txt value
    (info / "entry_points.txt").write_text(f"[crowdsft]\n{line}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("crowdsft_example_reward", None)


def test_builtins_by_kind():
    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    names = {kind: plugins.names(kind) for kind in KINDS}
    assert names == {
        "grouping": ["epsilon-greedy", "interleaved", "random"],
        "evaluation": ["cosine", "dot", "l1", "l2"],
        "selection": ["best"],
        "reward": ["credit", "marginal", "rank", "regression"],
        "influence": ["points-squared", "uniform"],
        "valuation": ["exact", "kernelshap", "permutation"],
        "embedder": ["goemotions", "minilm"],
        "admission": ["allowlist", "invite", "open"],
    }
    assert plugins.get("reward", "rank").plugin == "crowdsft.plugins.reward"
    assert plugins.create("grouping", "random", groups=3).groups == 3


def test_unknown_names_and_bad_options_are_clear():
    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    with pytest.raises(PluginError, match=r"no reward strategy named 'nope' \(registered: "):
        plugins.get("reward", "nope")
    with pytest.raises(PluginError, match="unknown strategy kind"):
        plugins.get("colour", "red")
    with pytest.raises(PluginError, match="grouping strategy 'random' has no option 'colour'"):
        plugins.create("grouping", "random", colour=1)


def test_two_plugins_cannot_claim_one_name_but_the_rest_still_works():
    plugins = Plugins(create_plugin_manager(load_entry_points=False))

    class Clash:
        @hookimpl
        def crowdsft_register_reward(self, register):
            register("rank", object)

    plugins.register(Clash(), name="clash")
    try:
        with pytest.raises(
            PluginError, match=r"registered by both.*CROWDSFT_DISABLE_PLUGINS=clash"
        ):
            plugins.get("reward", "rank")
        assert plugins.create("reward", "regression") is not None  # the others still work
        (problem,) = plugins.problems
        assert problem.kind == "conflict" and problem.plugin == "clash"
        assert "CROWDSFT_DISABLE_PLUGINS=clash" in problem.line()
    finally:
        plugins.unregister("clash")
    assert plugins.get("reward", "rank").plugin == "crowdsft.plugins.reward"


def test_every_registry_hook_registers(monkeypatch):
    """A plugin can add a strategy of every kind through its crowdsft_register_* hook."""
    plugins = Plugins(create_plugin_manager(load_entry_points=False))

    class Everything:
        """One implementation of every registry hook, each registering ``custom-<kind>``."""

        @hookimpl
        def crowdsft_register_grouping(self, register):
            register("custom-grouping", dict)

        @hookimpl
        def crowdsft_register_evaluation(self, register):
            register("custom-evaluation", dict)

        @hookimpl
        def crowdsft_register_selection(self, register):
            register("custom-selection", dict)

        @hookimpl
        def crowdsft_register_reward(self, register):
            register("custom-reward", dict)

        @hookimpl
        def crowdsft_register_influence(self, register):
            register("custom-influence", dict)

        @hookimpl
        def crowdsft_register_valuation(self, register):
            register("custom-valuation", dict)

        @hookimpl
        def crowdsft_register_embedder(self, register):
            register("custom-embedder", dict)

        @hookimpl
        def crowdsft_register_admission(self, register):
            register("custom-admission", dict)

    plugins.register(Everything(), name="everything")
    for kind in KINDS:
        s = plugins.get(kind, f"custom-{kind}")
        assert s.plugin == "everything" and plugins.create(kind, s.name, a=1) == {"a": 1}


def test_example_plugin_loads_through_its_entry_point(
    example_installed, fresh_plugins, synthetic_movielens
):
    plugins = fresh_plugins()
    strategy = plugins.get("reward", "winner-takes-all")
    assert strategy.plugin == "example_reward"
    out = CliRunner().invoke(main, ["plugins", "list", "--json"])
    assert out.exit_code == 0, out.output
    rewards = {r["name"]: r["plugin"] for r in json.loads(out.output)["reward"]}
    assert rewards["winner-takes-all"] == "example_reward"
    sim = CliRunner().invoke(
        main,
        [
            "simulate",
            "--users",
            "12",
            "--groups",
            "3",
            "--reward",
            "winner-takes-all",
            "--runs",
            "3",
            "--rounds",
            "20",
            "--valuation",
            "exact",
            "--json",
            "--data",
            str(synthetic_movielens),
        ],
    )
    assert sim.exit_code == 0, sim.output
    result = json.loads(sim.output)
    assert result["reward"] == "winner-takes-all" and result["runs"] == 3
    assert -1.0 <= result["mean_pearson"] <= 1.0


def test_blocking_a_plugin_by_name(example_installed, fresh_plugins, monkeypatch):
    monkeypatch.setenv("CROWDSFT_DISABLE_PLUGINS", "example_reward, crowdsft.plugins.influence")
    plugins = fresh_plugins()
    assert "winner-takes-all" not in plugins.names("reward")
    assert plugins.names("influence") == []
    assert "rank" in plugins.names("reward")


def test_tracing_logs_hook_calls(monkeypatch, caplog):
    monkeypatch.setenv("CROWDSFT_TRACE_PLUGINS", "1")
    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    with caplog.at_level("DEBUG", logger="crowdsft.plugins.manager"):
        plugins.registry()
    assert any("crowdsft_register_reward" in r.getMessage() for r in caplog.records)


def test_validate_contribution_hook_rejects_at_the_coordinator(coord, identity):
    """crowdsft_validate_contribution: any reason rejects with INVALID_ARGUMENT."""
    from crowdsft.envelope import new_nonce, now_ms, sign_envelope
    from crowdsft.v1 import contribution_pb2

    seen = []

    class NoShouting:
        @hookimpl
        def crowdsft_validate_contribution(self, node_id, examples):
            seen.append((node_id, examples))
            if any(e["response"].isupper() for e in examples):
                return "responses in capitals are not accepted"
            return None

    plugins = coord.coordinator.service.plugins
    plugins.register(NoShouting(), name="no-shouting")
    try:
        with coord.client() as c:

            def env(text):
                return sign_envelope(
                    identity,
                    contribution_pb2.ContributionPayload(
                        examples=[
                            contribution_pb2.Example(prompt=f"q {text}", response=text, system="s")
                        ],
                        nonce=new_nonce(),
                        timestamp_ms=now_ms(),
                    ),
                    coord.public_key,
                )

            c.stub.SubmitContribution(env("fine"), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                c.stub.SubmitContribution(env("LOUD"), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "responses in capitals are not accepted" in info.value.details()
        assert seen[0] == (
            identity.node_id,
            [{"prompt": "q fine", "response": "fine", "system": "s"}],
        )
        assert coord.counts()["contributions"] == 1
    finally:
        plugins.unregister("no-shouting")


def test_round_finished_hook_observes_every_round():
    from crowdsft.plugins.evaluation import L2
    from crowdsft.simulation.game import VectorSpace
    from crowdsft.tournament import StrategyNames, Tournament

    plugins = Plugins(create_plugin_manager(load_entry_points=False))
    records = []

    class Observer:
        @hookimpl
        def crowdsft_round_finished(self, record):
            records.append(record)

    plugins.register(Observer(), name="observer")
    rng = np.random.default_rng(0)
    space = VectorSpace(rng.uniform(0, 5, (9, 3)), rng.uniform(0, 5, 3), L2())
    strategies = StrategyNames(groups=3, influence="uniform").build(plugins)
    engine = Tournament(strategies, rounds=5, on_round=plugins.round_finished)
    state = engine.start(space, np.zeros(3))
    for _ in range(5):
        state, _, _ = engine.step(space, state, rng)
    assert [r.round_index for r in records] == [0, 1, 2, 3, 4]
    # Without node ids, the simulation names contributors by their index.
    assert sorted(n for g in records[0].group_nodes for n in g) == [str(i) for i in range(9)]


def hooks_used_in(source: str) -> set[str]:
    """Hook names that code uses: a function defined with the name (an implementation) or an
    attribute of that name (a call through ``pm.hook``). Comments and strings do not count."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
    return {n for n in found if n.startswith("crowdsft_")}


def test_hook_use_is_found_in_code_not_in_comments_or_strings():
    assert hooks_used_in("# crowdsft_round_finished is tested elsewhere\nx = 1\n") == set()
    assert hooks_used_in("s = 'crowdsft_round_finished'\n") == set()
    assert hooks_used_in("def crowdsft_round_finished(record): pass\n") == {
        "crowdsft_round_finished"
    }
    assert hooks_used_in("pm.hook.crowdsft_validate_contribution(x=1)\n") == {
        "crowdsft_validate_contribution"
    }


def test_every_hookspec_has_a_test():
    specs = [name for name in dir(hookspecs) if name.startswith("crowdsft_")]
    assert len(specs) == 10
    used: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        used |= hooks_used_in(path.read_text())
    missing = [name for name in specs if name not in used]
    assert not missing, f"hookspecs without a test: {missing}"


def _fake_distribution(root, entry_points: dict[str, str], modules: dict[str, str]):
    """An installed package on ``root`` (dist-info with entry points), as pip leaves one."""
    for name, code in modules.items():
        (root / f"{name}.py").write_text(code)
    info = root / "crowdsft_fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crowdsft-fake\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[crowdsft]\n{lines}")


def test_a_broken_or_sloppy_plugin_is_reported_and_the_rest_loads(tmp_path, monkeypatch, caplog):
    from click.testing import CliRunner

    from crowdsft.cli import main

    _fake_distribution(
        tmp_path,
        {
            "broken": "broken_plugin",
            "sloppy": "sloppy_plugin",
            "empty": "empty_plugin",
            "exiting": "exiting_plugin",
        },
        {
            "broken_plugin": "import numpy\nimport no_such_module_xyz\n",
            "exiting_plugin": "import sys\nsys.exit(3)\n",
            "sloppy_plugin": (
                "from crowdsft.plugins.hookspecs import hookimpl\n"
                "@hookimpl\n"
                "def crowdsft_register_rewards(register):\n"
                "    register('typo', dict)\n"
                "def crowdsft_register_grouping(register):\n"
                "    register('unmarked', dict)\n"
            ),
            "empty_plugin": "X = 1\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins(create_plugin_manager())
    by_plugin = {}
    for p in plugins.problems:
        by_plugin.setdefault(p.plugin, []).append(p)
    (broken,) = by_plugin["broken"]
    assert broken.kind == "broken" and broken.package == "crowdsft-fake 1.0"
    assert broken.where.endswith("broken_plugin.py:2") and "no_such_module_xyz" in broken.message
    assert "CROWDSFT_DISABLE_PLUGINS=broken" in broken.line()
    # a plugin that exits while it is imported is one broken plugin, not the end of the command
    (exiting,) = by_plugin["exiting"]
    assert exiting.kind == "broken" and exiting.where.endswith("exiting_plugin.py:2")
    assert "SystemExit(3)" in exiting.message
    sloppy = " / ".join(p.message for p in by_plugin["sloppy"])
    assert "crowdsft_register_rewards is not a Crowd-SFT hook" in sloppy
    assert "did you mean crowdsft_register_reward" in sloppy
    assert "crowdsft_register_grouping has no @hookimpl" in sloppy
    assert any("registers nothing" in p.message for p in by_plugin["empty"])
    assert "rank" in plugins.names("reward")  # the built-ins still load
    # and the command line still lists everything, broken plugins included
    get_plugins.cache_clear()
    try:
        result = CliRunner().invoke(main, ["plugins", "list"])
    finally:
        get_plugins.cache_clear()
    assert result.exit_code == 0, result.output
    assert "crowd-sft" in result.output and "problems (" in result.output
    assert "plugin 'broken' (crowdsft-fake 1.0" in result.output
    # disabling it as the line says silences it
    monkeypatch.setenv("CROWDSFT_DISABLE_PLUGINS", "broken")
    assert "broken" not in {p.plugin for p in Plugins(create_plugin_manager()).problems}


def test_an_unknown_strategy_option_lists_the_valid_ones():
    """Before: an unknown option gave Python's "unexpected keyword argument"; now the
    strategy's own options are listed."""
    import pytest

    from crowdsft.plugins.manager import PluginError, get_plugins

    plugins = get_plugins()
    with pytest.raises(PluginError, match=r"has no option 'bogus' \(its options: groups\)"):
        plugins.create("grouping", "random", groups=3, bogus=1)
    assert plugins.create("grouping", "random", groups=3) is not None
