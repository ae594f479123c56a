import pytest

from crowdsft.config import DEFAULT_COORDINATOR_TOML, load_coordinator_config, parse_hostport
from crowdsft.errors import ConfigError


def _cfg(tmp_path, text):
    p = tmp_path / "coordinator.toml"
    p.write_text(text)
    return p


def test_default_file_loads_with_defaults(tmp_path):
    cfg = load_coordinator_config(_cfg(tmp_path, DEFAULT_COORDINATOR_TOML))
    assert cfg.server.listen == "127.0.0.1:50051"
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.key_path == tmp_path / "coordinator.key"
    assert cfg.protocol.limits().max_examples_per_contribution == 64


def test_real_rounds_are_decided_by_their_scores_and_the_simulation_keeps_the_papers_error():
    """The paper's judging error is a simulated judge's mistake; in the coordinator's rounds
    the scores are measured, and a swap could install a worse model than the current one."""
    from crowdsft.config import RoundsConfig
    from crowdsft.simulation.game import Cell

    assert RoundsConfig().judging_error == 0.0
    assert RoundsConfig().names().judging_error == 0.0
    assert Cell(users=10, groups=3).names().judging_error == 0.05


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[server]\nlisten = 5", "server.listen must be a string"),
        ("[server]\nlisen = 'x:1'", "unknown key server.lisen"),
        ("[srever]\n", r"unknown section \[srever\]"),
        ("[protocol]\ntimestamp_window_s = 'soon'", "must be an integer"),
        ("[protocol]\nmax_field_bytes = 0", "max_field_bytes must be at least 1"),
        ("[admission]\npolicy = ''", "admission.policy must name a policy"),
        ("[admission]\nallowlist = [1]", r"admission.allowlist\[0\] must be a string"),
        ("[admission]\nallowlist = 'ab'", "admission.allowlist must be a list of strings"),
        ("[training]\nlayers = '8'", r"training.layers must be an integer, not '8' \(str\)"),
        ("[training]\nmax_steps = 2.5", "training.max_steps must be an integer"),
        ("[model]\ndevice = 1", "model.device must be a string"),
        ("[server]\nlisten = 'nohost'", "not HOST:PORT"),
        ("[rate_limit]\ncontributions_per_s = 0", "must be > 0"),
        ("[valuation]\nbudget = 0", "valuation.budget must be at least 1"),
        ("[valuation]\ntruncation = 1.5", r"valuation.truncation must lie in \[0, 1\)"),
        ("not = [toml", "not valid TOML"),
    ],
)
def test_bad_config_is_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_coordinator_config(_cfg(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="coordinator init"):
        load_coordinator_config(tmp_path / "absent.toml")


def test_hostport():
    assert parse_hostport("[::1]:50051") == ("[::1]", 50051)
    with pytest.raises(ConfigError, match="out of range"):
        parse_hostport("h:70000")


def test_bad_allowlist_entry_is_named(tmp_path):
    from crowdsft.plugins.admission import read_allowlist

    f = tmp_path / "allow.txt"
    f.write_text("# ok\n" + "ab" * 16 + "\nnot-a-key\n")
    with pytest.raises(ConfigError, match=r"allow.txt:3: 'not-a-key'"):
        read_allowlist((), f)


def test_unknown_admission_policy_is_named_at_start(make_coordinator):
    with pytest.raises(
        ConfigError,
        match=r"admission.policy = 'closed': no admission strategy named 'closed'.*invite",
    ):
        make_coordinator(admission={"policy": "closed"})


def _config_with(tmp_path, old: str, new: str):
    from crowdsft.coordinator.server.scaffold import init_coordinator

    path = init_coordinator(tmp_path / "c", listen="127.0.0.1:0", force=True)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('reward = "rank"', 'reward = "rnak"', "rounds.reward = 'rnak'"),
        ('grouping = "random"', 'grouping = "randm"', "rounds.grouping = 'randm'"),
        ('method = ""', 'method = "tmc"', "valuation.method = 'tmc'"),
        ('function = "l2"', 'function = "l3"', "evaluation.function = 'l3'"),
        ('\nembedder = "minilm"', '\nembedder = "minlm"', "evaluation.embedder = 'minlm'"),
        (
            'near_duplicate_embedder = "minilm"',
            'near_duplicate_embedder = "minlm"',
            "admission.near_duplicate_embedder = 'minlm'",
        ),
    ],
)
def test_a_misspelled_strategy_is_refused_when_the_config_loads(tmp_path, old, new, key):
    path = _config_with(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_coordinator_config(path)
    message = str(info.value)
    assert str(path) in message and key in message and "registered:" in message


def test_strategy_options_come_from_the_config_and_are_checked(tmp_path):
    good = _config_with(
        tmp_path / "g",
        "auto_interval_s = 0\n",
        "auto_interval_s = 0\n[rounds.reward_options]\nscale = 5.0\n",
    )
    good.write_text(good.read_text().replace('reward = "rank"', 'reward = "regression"'))
    config = load_coordinator_config(good)
    assert config.rounds.reward_options == {"scale": 5.0}
    names = config.rounds.names()
    assert names.build().reward.scale == 5.0
    assert names.as_dict()["options"] == {"reward": {"scale": 5.0}}  # named in the ledger
    bad = _config_with(
        tmp_path / "b",
        "auto_interval_s = 0\n",
        "auto_interval_s = 0\n[rounds.reward_options]\nscael = 5.0\n",
    )
    bad.write_text(bad.read_text().replace('reward = "rank"', 'reward = "regression"'))
    with pytest.raises(ConfigError, match=r"rounds.reward_options: .*scael"):
        load_coordinator_config(bad)
    wrong = _config_with(
        tmp_path / "w", "auto_interval_s = 0\n", "auto_interval_s = 0\nreward_options = 3\n"
    )
    with pytest.raises(ConfigError, match=r"rounds.reward_options must be a table"):
        load_coordinator_config(wrong)


def test_valuation_settings_build_the_estimator(tmp_path):
    import numpy as np

    from crowdsft.plugins.evaluation import L2
    from crowdsft.plugins.manager import get_plugins
    from crowdsft.plugins.valuation import CentroidGame, FunctionGame

    cfg = load_coordinator_config(_cfg(tmp_path, DEFAULT_COORDINATOR_TOML))
    assert cfg.valuation_method == "permutation"
    text = DEFAULT_COORDINATOR_TOML.replace('method = ""', 'method = "exact"')
    assert load_coordinator_config(_cfg(tmp_path, text)).valuation_method == "exact"
    older = load_coordinator_config(_cfg(tmp_path, "[rounds]\nvaluation = 'kernelshap'"))
    assert older.valuation_method == "kernelshap"  # files without [valuation] keep working
    budget = DEFAULT_COORDINATOR_TOML.replace("budget = 20000", "budget = 64").replace(
        "target_stderr = 0.01", "target_stderr = 1e-9"
    )
    method = load_coordinator_config(_cfg(tmp_path, budget)).valuation.build(
        "permutation", get_plugins()
    )
    rng = np.random.default_rng(0)
    game = CentroidGame(rng.uniform(size=(30, 4)), rng.uniform(size=4), L2())
    result = method(game, rng)
    assert result.samples == 64 and not result.converged  # the budget stopped it
    trunc = budget.replace("truncation = 0.0", "truncation = 0.01")
    tmc = load_coordinator_config(_cfg(tmp_path, trunc)).valuation.build(
        "permutation", get_plugins()
    )
    calls = []
    tmc(FunctionGame(10, lambda m: calls.append(1) or float(min(m.sum(), 2))), rng)
    # 64 samples of an antithetic pair: without truncation 2 * 9 values each
    assert 0 < len(calls) <= 64 * 2 * 2 + 4 < 64 * 2 * 9  # + the two ends, per batch


def test_environment_variables_override_the_file_and_are_checked(tmp_path, monkeypatch):
    path = _cfg(tmp_path, DEFAULT_COORDINATOR_TOML)
    monkeypatch.setenv("CROWDSFT_TRAINING__LAYERS", "4")
    monkeypatch.setenv("CROWDSFT_TRAINING__TARGET_MODULES", '["q_proj", "k_proj"]')
    monkeypatch.setenv("CROWDSFT_SERVER__LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("CROWDSFT_HOME", str(tmp_path))  # not a config key: left alone
    cfg = load_coordinator_config(path)
    assert cfg.training.layers == 4 and cfg.training.target_modules == ("q_proj", "k_proj")
    assert cfg.server.listen == "0.0.0.0:6000"
    assert cfg.training.learning_rate == 0.001  # the file's value where nothing overrides it
    monkeypatch.setenv("CROWDSFT_TRAINING__LAYERS", "four")
    with pytest.raises(
        ConfigError,
        match=r"environment variable CROWDSFT_TRAINING__LAYERS: "
        r"training.layers must be an integer, not 'four'",
    ):
        load_coordinator_config(path)
    monkeypatch.delenv("CROWDSFT_TRAINING__LAYERS")
    monkeypatch.setenv("CROWDSFT_TRAINING__LAYRS", "4")
    with pytest.raises(
        ConfigError,
        match=r"environment variable CROWDSFT_TRAINING__LAYRS: unknown key training\.layrs",
    ):
        load_coordinator_config(path)


def test_an_unknown_strategy_from_the_environment_is_blamed_on_the_variable(tmp_path, monkeypatch):
    path = _cfg(tmp_path, DEFAULT_COORDINATOR_TOML)
    monkeypatch.setenv("CROWDSFT_ROUNDS__REWARD", "per-wn")
    with pytest.raises(ConfigError) as found:
        load_coordinator_config(path)
    message = str(found.value)
    assert message.startswith("environment variable CROWDSFT_ROUNDS__REWARD: rounds.reward")
    assert str(path) not in message
    monkeypatch.delenv("CROWDSFT_ROUNDS__REWARD")
    monkeypatch.setenv("CROWDSFT_ROUNDS__REWARD_OPTIONS", "{scael = 2}")
    with pytest.raises(
        ConfigError, match=r"^environment variable CROWDSFT_ROUNDS__REWARD_OPTIONS: rounds\."
    ):
        load_coordinator_config(path)
    monkeypatch.delenv("CROWDSFT_ROUNDS__REWARD_OPTIONS")
    monkeypatch.setenv("crowdsft_rounds__reward_options__scael", "2")  # any case, nested
    with pytest.raises(
        ConfigError, match=r"^environment variable crowdsft_rounds__reward_options__scael: "
    ):
        load_coordinator_config(path)


def test_the_template_shows_every_key_with_its_default():
    """The commented template and the sections' defaults cannot drift apart: every key of
    every section is in the template (commented out where it has no default), with the
    section's own default value."""
    import dataclasses
    import re
    import tomllib
    from pathlib import Path

    from crowdsft.config import _SECTIONS

    parsed = tomllib.loads(DEFAULT_COORDINATOR_TOML)
    for name, cls in _SECTIONS.items():
        table = parsed.get(name, {})
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name in table:
                value = table[f.name]
                if isinstance(default, Path):
                    value = Path(value)
                elif isinstance(default, tuple):
                    value = tuple(value)
                assert value == default, f"{name}.{f.name}: template {value!r}, default {default!r}"
            else:
                # no default worth writing (None, an empty table): shown commented out
                assert default in (None, {}), f"{name}.{f.name} is missing from the template"
                pattern = rf"^# (\[{name}\.)?{f.name}( =|\])"
                assert re.search(pattern, DEFAULT_COORDINATOR_TOML, re.M), f"{name}.{f.name}"


def test_the_template_is_rendered_from_the_sections_defaults_and_docs(monkeypatch):
    """One source: a section's keys, defaults and docs make the template; a key without a
    default shows its example commented out, an options table its example entries."""
    import tomllib
    from pathlib import Path
    from typing import Any

    import pydantic

    from crowdsft import config

    @pydantic.dataclasses.dataclass(frozen=True)
    class Demo:
        name: str = config.setting('a "quoted" é', "What it is called.")
        path: Path = config.setting(Path("data/x"))
        modules: tuple[str, ...] = config.setting(("q", "v"), "Modules.")
        on: bool = config.setting(False)
        rate: float = config.setting(1e-3)
        layers: int | None = config.setting(None, "Unset: all.", example=8)
        opts: dict[str, Any] = config.setting(factory=dict, doc="Options:", example={"k": 2.5})

    monkeypatch.setattr(config, "_SECTIONS", {"demo": Demo})
    text = config.render_template()
    assert "\n[demo]\n# What it is called.\nname = " in text
    assert "# Unset: all.\n# layers = 8\n" in text
    assert text.endswith("# Options:\n# [demo.opts]\n# k = 2.5\n")
    parsed = tomllib.loads(text)["demo"]
    assert parsed == {
        "name": 'a "quoted" é',
        "path": "data/x",
        "modules": ["q", "v"],
        "on": False,
        "rate": 0.001,
    }
    uncommented = "\n".join(line.removeprefix("# ") for line in text.splitlines()[-2:])
    assert tomllib.loads(uncommented) == {"demo": {"opts": {"k": 2.5}}}


def test_every_section_of_the_real_template_is_documented():
    import dataclasses

    from crowdsft.config import _SECTIONS, render_template

    assert render_template() == DEFAULT_COORDINATOR_TOML
    for name, cls in _SECTIONS.items():
        fields = dataclasses.fields(cls)
        assert fields[0].metadata.get("doc"), f"[{name}] starts with a key without a comment"
        for f in fields:
            assert "doc" in f.metadata, f"{name}.{f.name} is not declared with setting()"
            if f.default is None:
                assert f.metadata["example"] is not None, f"{name}.{f.name} shows no example"


def test_tools_set_keys_through_the_template(tmp_path):
    from crowdsft.config import render_template, update_config_file
    from crowdsft.errors import ConfigError

    path = _cfg(tmp_path, DEFAULT_COORDINATOR_TOML)
    update_config_file(
        path, {"training": {"layers": 4}, "rounds": {"selection_options": {"guard": False}}}
    )
    update_config_file(path, {"rounds": {"groups": 2}})  # what the file holds stays
    cfg = load_coordinator_config(path)
    assert (cfg.training.layers, cfg.rounds.groups) == (4, 2)
    assert cfg.rounds.selection_options == {"guard": False}
    assert "[rounds.selection_options]\nguard = false\n" in path.read_text()
    with pytest.raises(ConfigError, match=r"unknown key training\.layrs"):
        render_template({"training": {"layrs": 4}})
    with pytest.raises(ConfigError, match=r"unknown section \[trainer\]"):
        render_template({"trainer": {}})


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("contributions_per_s = 50.0", "contributions_per_s = nan"),
        ("peer_bytes_per_s = 2097152.0", "peer_bytes_per_s = inf"),
        ("judging_error = 0.0", "judging_error = nan"),
    ],
)
def test_nan_and_infinity_are_refused_where_a_number_belongs(tmp_path, old, new):
    """TOML has nan and inf; every "> 0" check lets NaN through, and a NaN rate turns a
    limit off."""
    path = _config_with(tmp_path, old, new)
    with pytest.raises(ConfigError, match="finite"):
        load_coordinator_config(path)


def test_a_plaintext_listener_others_can_reach_is_warned_about(tmp_path):
    import dataclasses

    from crowdsft.coordinator.server.app import exposure_warnings

    config = load_coordinator_config(_config_with(tmp_path, "[server]", "[server]"))
    assert exposure_warnings(config, "127.0.0.1:50051") == []
    assert exposure_warnings(config, "[::1]:50051") == []
    (public,) = exposure_warnings(config, "0.0.0.0:50051")
    assert "plaintext" in public and "--tls" in public
    invite = dataclasses.replace(
        config, admission=dataclasses.replace(config.admission, policy="invite")
    )
    _, tokens = exposure_warnings(invite, "203.0.113.5:50051")
    assert "invite tokens" in tokens
    tls = dataclasses.replace(
        config,
        server=dataclasses.replace(
            config.server, tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "k.pem"
        ),
    )
    assert exposure_warnings(tls, "0.0.0.0:50051") == []
