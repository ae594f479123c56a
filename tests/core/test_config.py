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


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[server]\nlisten = 5", "server.listen must be a string"),
        ("[server]\nlisen = 'x:1'", "unknown key server.lisen"),
        ("[srever]\n", r"unknown section \[srever\]"),
        ("[protocol]\ntimestamp_window_s = 'soon'", "must be an integer"),
        ("[protocol]\nmax_field_bytes = 0", "max_field_bytes must be at least 1"),
        ("[admission]\npolicy = ''", "admission.policy must name a policy"),
        ("[admission]\nallowlist = [1]", "must be a list of strings"),
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
    from crowdsft.plugins.manager import PluginError

    with pytest.raises(PluginError, match=r"no admission strategy named 'closed'.*invite"):
        make_coordinator(admission={"policy": "closed"})


def test_valuation_settings_build_the_estimator(tmp_path):
    import numpy as np

    from crowdsft.plugins.evaluation import L2
    from crowdsft.plugins.manager import get_plugins
    from crowdsft.plugins.valuation import CentroidGame, FunctionGame

    cfg = load_coordinator_config(_cfg(tmp_path, DEFAULT_COORDINATOR_TOML))
    assert cfg.valuation_method == "permutation"
    text = DEFAULT_COORDINATOR_TOML.replace('method = "permutation"', 'method = "exact"')
    assert load_coordinator_config(_cfg(tmp_path, text)).valuation_method == "exact"
    older = load_coordinator_config(_cfg(tmp_path, "[rounds]\nvaluation = 'kernelshap'"))
    assert older.valuation_method == "kernelshap"  # files without [valuation] keep working
    budget = DEFAULT_COORDINATOR_TOML.replace("budget = 20000", "budget = 64").replace(
        "target_stderr = 0.01", "target_stderr = 1e-9"
    )
    method = load_coordinator_config(_cfg(tmp_path, budget)).valuation.build("x", get_plugins())
    rng = np.random.default_rng(0)
    game = CentroidGame(rng.uniform(size=(30, 4)), rng.uniform(size=4), L2())
    result = method(game, rng)
    assert result.samples == 64 and not result.converged  # the budget stopped it
    trunc = budget.replace("truncation = 0.0", "truncation = 0.01")
    tmc = load_coordinator_config(_cfg(tmp_path, trunc)).valuation.build("x", get_plugins())
    calls = []
    tmc(FunctionGame(10, lambda m: calls.append(1) or float(min(m.sum(), 2))), rng)
    # 64 samples of an antithetic pair: without truncation 2 * 9 values each
    assert 0 < len(calls) <= 64 * 2 * 2 + 4 < 64 * 2 * 9  # + the two ends, per batch
