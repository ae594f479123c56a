import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from crowdsft.cli import main
from crowdsft.simulation.game import (
    SUMMARY_COLUMNS,
    Cell,
    default_data_dir,
    load_movielens,
    population,
    run_cell,
)
from crowdsft.stats import pearson, rankdata, spearman

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"MovieLens data not at {DATA}")


@pytest.fixture
def tiny_movielens(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "movies.csv").write_text(
        "movieId,title,genres\n1,A,Comedy|Drama\n2,B,Drama\n3,C,(no genres listed)\n"
    )
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,0\n1,2,2.0,0\n2,3,5.0,0\n2,1,1.0,0\n3,2,3.5,0\n4,1,2.0,0\n4,3,1.0,0\n"
    )
    return d


def test_preprocessing_mean_rating_per_genre(tiny_movielens):
    ml = load_movielens(tiny_movielens)
    assert ml.genres == ("(no genres listed)", "Comedy", "Drama")
    assert ml.user_ids.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(
        ml.vectors,
        [[0.0, 4.0, 3.0], [5.0, 1.0, 1.0], [0.0, 0.0, 3.5], [1.0, 2.0, 2.0]],
    )


def test_population_is_the_first_users_shuffled_with_seed_42(tiny_movielens):
    ml = load_movielens(tiny_movielens)
    pop = population(ml, 2)
    order = np.random.RandomState(42).permutation(3)
    np.testing.assert_array_equal(pop, ml.vectors[:3][order])


def test_missing_data_is_a_clear_error(tmp_path):
    from crowdsft.errors import InputError

    with pytest.raises(InputError, match=r"movies\.csv not found"):
        load_movielens(tmp_path)


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)


@needs_data
def test_movielens_has_twenty_genres():
    ml = load_movielens(DATA)
    assert len(ml.genres) == 20 and "(no genres listed)" in ml.genres
    assert ml.vectors.shape == (610, 20)
    assert ml.vectors.min() >= 0 and ml.vectors.max() <= 5


def test_a_cell_is_seeded_and_paired(synthetic_movielens):
    data = synthetic_movielens
    cell = Cell(users=15, groups=3, runs=3, rounds=30, valuation="exact")
    a, b = run_cell(cell, data), run_cell(cell, data)
    np.testing.assert_array_equal(a.final_distance, b.final_distance)
    np.testing.assert_array_equal(a.pearson, b.pearson)
    assert a.distance_curve[-1] < a.distance_curve[0]
    # Another grouping sees the same experts and starting points: the same initial distance.
    other = run_cell(
        Cell(users=15, groups=3, runs=3, rounds=30, valuation="exact", grouping="interleaved"), data
    )
    assert other.distance_curve[0] == pytest.approx(a.distance_curve[0])


@needs_data
def test_simulate_cli(tmp_path):
    out = CliRunner().invoke(
        main,
        [
            "simulate",
            "--users",
            "10",
            "--groups",
            "2",
            "--runs",
            "2",
            "--rounds",
            "20",
            "--valuation",
            "exact",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert set(SUMMARY_COLUMNS) <= set(r)
    bad = CliRunner().invoke(main, ["simulate", "--reward", "nope"])
    assert bad.exit_code == 2 and "no reward strategy named 'nope'" in bad.output


def test_simulate_takes_strategy_options_and_checks_them(synthetic_movielens):
    base = ["simulate", "--users", "10", "--groups", "2", "--runs", "2", "--rounds", "10"]
    base += ["--valuation", "exact", "--data", str(synthetic_movielens), "--json"]
    runs = {}
    for scale in (2, 20):
        out = CliRunner().invoke(
            main, [*base, "--reward", "regression", "--option", f"reward.scale={scale}"]
        )
        assert out.exit_code == 0, out.output
        runs[scale] = {k: v for k, v in json.loads(out.output).items() if k != "seconds"}
    # the option reached the rule: the points (and so the influence weights) differ
    assert runs[2] != runs[20]
    typo = CliRunner().invoke(main, [*base, "--reward", "regression", "--option", "reward.scael=2"])
    assert typo.exit_code == 2 and "scael" in typo.output
    shape = CliRunner().invoke(main, [*base, "--option", "scale=2"])
    assert shape.exit_code == 2 and "KIND.KEY=VALUE" in shape.output


def test_sweep_on_a_small_grid(tmp_path, synthetic_movielens):
    out_dir = tmp_path / "sweep"
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            "--users",
            "10,12",
            "--groups",
            "2,3",
            "--grouping",
            "random,interleaved",
            "--evaluation",
            "l2,dot",
            "--runs",
            "2",
            "--rounds",
            "15",
            "--workers",
            "2",
            "--no-progress",
            "--data",
            str(synthetic_movielens),
            "--out",
            str(out_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    with (out_dir / "summary.csv").open() as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
    assert len(rows) == 2 * 2 * 2 * 2
    assert {(r["users"], r["groups"]) for r in rows} == {
        ("10", "2"),
        ("10", "3"),
        ("12", "2"),
        ("12", "3"),
    }
    for r in rows:
        assert r["runs"] == "2" and float(r["mean_final_distance"]) > 0
        assert -1 <= float(r["mean_pearson"]) <= 1
    for name in ("distance_over_rounds.png", "pearson_vs_distance.png", "pearson_vs_users.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CROWDSFT_DATA", str(tmp_path))
    assert default_data_dir() == Path(tmp_path)


def test_a_sweep_on_ray_gives_the_local_sweeps_summary(tmp_path, synthetic_movielens):
    ray = pytest.importorskip("ray")
    args = [
        "sweep",
        "--users",
        "10",
        "--groups",
        "2,3",
        "--grouping",
        "random",
        "--evaluation",
        "l2",
        "--runs",
        "2",
        "--rounds",
        "10",
        "--no-progress",
        "--no-plots",
        "--data",
        str(synthetic_movielens),
    ]
    local = CliRunner().invoke(main, [*args, "--workers", "1", "--out", str(tmp_path / "a")])
    assert local.exit_code == 0, local.output
    try:
        on_ray = CliRunner().invoke(main, [*args, "--ray", "--out", str(tmp_path / "b")])
    finally:
        ray.shutdown()
    assert on_ray.exit_code == 0, on_ray.output
    assert (tmp_path / "a" / "summary.csv").read_text() == (
        tmp_path / "b" / "summary.csv"
    ).read_text()
    bad = CliRunner().invoke(main, [*args, "--ray", "127.0.0.1:1", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "no Ray cluster answers" in bad.output + bad.stderr


def test_a_failing_reward_plugin_is_one_line_in_simulate(synthetic_movielens, monkeypatch):
    from crowdsft import hookimpl
    from crowdsft.plugins import manager
    from crowdsft.plugins.testing import registered
    from crowdsft.simulation import game

    class Broken:
        def reset(self, n):
            pass

        def observe(self, outcome):
            pass

        def update(self, points, outcome):
            return points + outcome.winner  # no such field

    class Plugin:
        @hookimpl
        def crowdsft_register_reward(self, register):
            register("buggy-win", Broken)

    with registered(Plugin(), name="buggy") as plugins:
        monkeypatch.setattr(manager, "get_plugins", lambda: plugins)
        monkeypatch.setattr(game, "get_plugins", lambda: plugins)
        args = ["simulate", "--users", "6", "--groups", "2", "--runs", "1", "--rounds", "3"]
        args += ["--valuation", "exact", "--data", str(synthetic_movielens), "--reward"]
        out = CliRunner().invoke(main, [*args, "buggy-win"])
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output
    lines = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "the reward strategy 'buggy-win' failed: AttributeError" in lines[0]
    assert "test_simulation.py:" in lines[0]


def test_sweep_takes_strategy_options_and_refuses_too_many_players_for_exact(
    tmp_path, synthetic_movielens
):
    base = ["sweep", "--users", "10", "--groups", "2", "--grouping", "epsilon-greedy"]
    base += ["--evaluation", "l2", "--valuation", "exact", "--runs", "2", "--rounds", "10"]
    base += ["--no-progress", "--no-plots", "--workers", "1", "--data", str(synthetic_movielens)]
    rows = {}
    for jitter in (0, 1.5):
        out = tmp_path / f"j{jitter}"
        result = CliRunner().invoke(
            main, [*base, "--option", f"grouping.jitter={jitter}", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        with (out / "summary.csv").open() as fh:
            rows[jitter] = next(csv.DictReader(fh))
    # the option reached the grouping: the games differ
    assert rows[0]["mean_pearson"] != rows[1.5]["mean_pearson"]
    typo = CliRunner().invoke(main, [*base, "--option", "grouping.jitr=1", "--out", str(tmp_path)])
    assert typo.exit_code == 2 and "jitr" in typo.output
    # 25 players for exact values: one line before any work, no traceback from a worker
    many = CliRunner().invoke(main, [*base, "--users", "10,25", "--out", str(tmp_path / "many")])
    assert many.exit_code == 2 and "Traceback" not in many.output
    assert "'exact' values at most 20 players and --users asks for 25" in many.output
    assert not (tmp_path / "many").exists()
    alone = CliRunner().invoke(
        main, ["simulate", "--users", "25", "--valuation", "exact", "--runs", "1"]
    )
    assert alone.exit_code == 2 and "at most 20 players" in alone.output


def test_a_crowdsft_error_in_a_ray_task_is_its_own_one_line(monkeypatch):
    """On Ray, a strategy's failure in a task arrives wrapped in Ray's error, whose message
    holds the worker's whole traceback; the sweep raises the error itself."""
    import sys
    import types

    from crowdsft.errors import CrowdSFTError
    from crowdsft.simulation import game

    class RayTaskError(Exception):
        def __init__(self, cause):
            super().__init__("ray.exceptions.RayTaskError: Traceback (most recent call last): ...")
            self.cause = cause

    def get(ref):
        if isinstance(ref, Exception):
            raise RayTaskError(ref)
        return ref

    fake = types.SimpleNamespace(
        is_initialized=lambda: True,
        remote=lambda fn: types.SimpleNamespace(remote=fn),
        get=get,
        exceptions=types.SimpleNamespace(RayTaskError=RayTaskError),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    mapper = game._ray_map("local")
    failing = CrowdSFTError("the reward strategy 'buggy-win' failed: AttributeError: x")
    assert list(mapper(lambda job: job * 2, [1, 2])) == [2, 4]
    with pytest.raises(CrowdSFTError) as found:
        list(mapper(lambda job: failing if job else 0, [0, 1]))
    assert found.value is failing
    with pytest.raises(RayTaskError):  # anything else stays Ray's
        list(mapper(lambda job: ValueError("other"), [1]))


def test_the_shapley_games_score_with_the_evaluation_options_the_tournament_uses(
    monkeypatch, synthetic_movielens
):
    """An evaluation plugin's options (--option evaluation.KEY=VALUE) reach the Shapley games
    too, not only the tournament: points and values are measured with one evaluation."""
    import numpy as np

    from crowdsft import hookimpl
    from crowdsft.plugins.testing import registered
    from crowdsft.simulation import game

    built = []

    class Scaled:
        def __init__(self, scale: float = 1.0) -> None:
            built.append(scale)
            self.scale = scale

        def __call__(self, candidates, target):
            return -self.scale * np.linalg.norm(np.asarray(candidates) - target, axis=-1)

    class Plugin:
        @hookimpl
        def crowdsft_register_evaluation(self, register):
            register("scaled-l2", Scaled)

    vectors = np.random.default_rng(0).uniform(0, 5, (7, 4))
    with registered(Plugin(), name="scaled") as plugins:
        monkeypatch.setattr(game, "get_plugins", lambda: plugins)
        plain = game.shapley_values(vectors, 0, "scaled-l2", "exact", 0)
        scaled = game.shapley_values(
            vectors, 0, "scaled-l2", "exact", 0, evaluation_options={"scale": 3.0}
        )
        args = (6, 0, "scaled-l2", "exact", 0, str(synthetic_movielens), {"scale": 3.0})
        job = game._shapley_job(args)
    assert built[:2] == [1.0, 3.0] and built[-1] == 3.0
    assert np.allclose(scaled, 3.0 * plain)  # exact values scale with the game
    assert job[0] == (6, "scaled-l2", "exact", 0)
