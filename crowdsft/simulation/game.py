"""The paper's vector-space simulation on MovieLens, and the sweep over its grid.

Preprocessing (PAPER.md): every user is a 20-dimensional vector of mean ratings per genre (0
where the user rated no movie of the genre; "(no genres listed)" counts as a genre). For N
contributors, the first N+1 users by id are shuffled (as pandas' ``sample(frac=1,
random_state=42)`` does) and one, drawn at random per run, becomes the expert point; the
other N contribute. The initial model is uniform in [0, 5]^20, delta = 0.1.

Runs are seeded: run ``r`` of a simulation with seed ``s`` and N users draws its expert and
initial model from ``(s, N, r)`` only, so every strategy combination sees the same games and
starting points (paired comparisons), and Shapley values are computed once per game.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.config import check_ray_address
from crowdsft.errors import ConfigError, CrowdSFTError, InputError
from crowdsft.plots import pyplot, save
from crowdsft.plugins.evaluation import Evaluation
from crowdsft.plugins.manager import get_plugins
from crowdsft.plugins.valuation import CentroidGame
from crowdsft.stats import nanmean, pearson, spearman
from crowdsft.tournament import StrategyNames, Tournament

DEFAULT_DATA = "movielens-latest-small"
DISTANCE_THRESHOLD = 5.0
SUMMARY_COLUMNS = (
    "users",
    "groups",
    "grouping",
    "evaluation",
    "reward",
    "valuation",
    "runs",
    "mean_final_distance",
    "mean_rounds_to_5",
    "mean_pearson",
    "mean_spearman",
)


def default_data_dir() -> Path:
    """``$CROWDSFT_DATA``; else what ``crowdsft data fetch movielens`` fetched (the user's data
    folder); else the shared MovieLens folder beside a development checkout; else the
    user's data folder (missing: ``load_movielens`` says how to fetch it)."""
    from .fetch import movielens_home

    env = os.environ.get("CROWDSFT_DATA")
    if env:
        return Path(env)
    fetched = movielens_home()
    if fetched.is_dir():
        return fetched
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data" / DEFAULT_DATA
        if candidate.is_dir():
            return candidate
    return fetched


@dataclass(frozen=True)
class MovieLens:
    user_ids: np.ndarray  # sorted
    vectors: np.ndarray  # (users, genres)
    genres: tuple[str, ...]


@functools.cache
def load_movielens(data_dir: Path) -> MovieLens:
    """Per-user mean rating per genre from ``movies.csv`` and ``ratings.csv``."""
    data_dir = Path(data_dir)
    movies_path, ratings_path = data_dir / "movies.csv", data_dir / "ratings.csv"
    for p in (movies_path, ratings_path):
        if not p.is_file():
            raise InputError(
                f"{p} not found: fetch the MovieLens data with `crowdsft data fetch movielens`, "
                "or name a folder with movies.csv and ratings.csv (ml-latest-small) with --data"
            )
    movie_genres: dict[int, list[str]] = {}
    with movies_path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            movie_genres[int(row["movieId"])] = row["genres"].split("|")
    genres = tuple(sorted({g for gs in movie_genres.values() for g in gs}))
    col = {g: i for i, g in enumerate(genres)}
    users: list[int] = []
    cells: list[int] = []
    values: list[float] = []
    with ratings_path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            gs = movie_genres.get(int(row["movieId"]))
            if gs is None:
                continue
            for g in gs:
                users.append(int(row["userId"]))
                cells.append(col[g])
                values.append(float(row["rating"]))
    uid = np.asarray(users)
    user_ids, inverse = np.unique(uid, return_inverse=True)
    sums = np.zeros((len(user_ids), len(genres)))
    counts = np.zeros_like(sums)
    np.add.at(sums, (inverse, np.asarray(cells)), np.asarray(values))
    np.add.at(counts, (inverse, np.asarray(cells)), 1.0)
    vectors = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return MovieLens(user_ids, vectors, genres)


def population(data: MovieLens, n_users: int) -> np.ndarray:
    """The first ``n_users + 1`` users by id, shuffled as pandas' ``sample(frac=1,
    random_state=42)`` shuffles them: vectors ``(n_users + 1, genres)``."""
    if n_users < 1 or n_users + 1 > len(data.user_ids):
        raise InputError(f"users must lie in 1..{len(data.user_ids) - 1}, not {n_users}")
    order = np.random.RandomState(42).permutation(n_users + 1)
    return data.vectors[: n_users + 1][order]


def run_rng(seed: int, n_users: int, run: int) -> np.random.Generator:
    return np.random.default_rng([seed, n_users, run])


def expert_of(seed: int, n_users: int, run: int) -> int:
    """Index (in the shuffled population) of the expert of a run."""
    return int(run_rng(seed, n_users, run).integers(n_users + 1))


class VectorSpace:
    """The paper's simulation: a model is a point; the candidate of a group is
    ``base + delta * (weighted centroid of the members - base)``; scores come from an
    evaluation function against the expert point."""

    def __init__(
        self, vectors: np.ndarray, target: np.ndarray, evaluation: Evaluation, delta: float = 0.1
    ) -> None:
        self.x = np.asarray(vectors, dtype=float)
        self.target = np.asarray(target, dtype=float)
        self.evaluation = evaluation
        self.delta = delta
        self.n_contributors = len(self.x)

    def propose(self, base, members, weights, rng):
        total = weights.sum()
        if total > 0:
            centroid = weights @ self.x[members] / total
        else:  # every member has zero weight: fall back to the plain centroid
            centroid = self.x[members].mean(axis=0)
        return base + self.delta * (centroid - base)

    def score(self, models):
        return self.evaluation(np.asarray(models), self.target)

    def distance(self, model: np.ndarray) -> float:
        return float(np.linalg.norm(model - self.target))


@dataclass(frozen=True)
class Cell:
    users: int
    groups: int
    grouping: str = "random"
    evaluation: str = "l2"
    reward: str = "rank"
    valuation: str = "permutation"
    influence: str = "points-squared"
    selection: str = "best"
    error: float = 0.05
    rounds: int = 100
    runs: int = 50
    seed: int = 0
    delta: float = 0.1

    def names(self, options: dict[str, Any] | None = None) -> StrategyNames:
        return StrategyNames(
            grouping=self.grouping,
            groups=self.groups,
            selection=self.selection,
            judging_error=self.error,
            reward=self.reward,
            influence=self.influence,
            options=options or {},
        )


@dataclass
class CellResult:
    cell: Cell
    final_distance: np.ndarray  # per run
    rounds_to_5: np.ndarray  # per run, NaN where never reached
    pearson: np.ndarray
    spearman: np.ndarray
    distance_curve: np.ndarray  # mean distance after each round (rounds + 1 points)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        c = self.cell
        return {
            "users": c.users,
            "groups": c.groups,
            "grouping": c.grouping,
            "evaluation": c.evaluation,
            "reward": c.reward,
            "valuation": c.valuation,
            "runs": c.runs,
            "mean_final_distance": float(np.mean(self.final_distance)),
            "mean_rounds_to_5": nanmean(self.rounds_to_5),
            "mean_pearson": nanmean(self.pearson),
            "mean_spearman": nanmean(self.spearman),
        }


def shapley_values(
    vectors: np.ndarray,
    expert: int,
    evaluation: str,
    valuation: str,
    seed: int,
    options: dict[str, Any] | None = None,
    evaluation_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Shapley values of the contributors in the centroid game for one expert (``options``:
    the valuation's; ``evaluation_options``: the evaluation's, as the tournament's)."""
    plugins = get_plugins()
    target = vectors[expert]
    contributors = np.delete(vectors, expert, axis=0)
    game = CentroidGame(
        contributors, target, plugins.create("evaluation", evaluation, **(evaluation_options or {}))
    )
    method = plugins.create("valuation", valuation, **(options or {}))
    rng = np.random.default_rng([seed, len(contributors), expert, 7])
    return method(game, rng).values


def run_cell(
    cell: Cell,
    data_dir: Path,
    shapley: dict[int, np.ndarray] | None = None,
    strategy_options: dict[str, dict[str, Any]] | None = None,
) -> CellResult:
    """All runs of one cell. ``shapley`` maps expert index to Shapley values (computed here
    when missing)."""
    plugins = get_plugins()
    opts = strategy_options or {}
    vectors = population(load_movielens(Path(data_dir)), cell.users)
    evaluation = plugins.create("evaluation", cell.evaluation, **opts.get("evaluation", {}))
    final = np.empty(cell.runs)
    to5 = np.full(cell.runs, np.nan)
    pr = np.full(cell.runs, np.nan)
    sp = np.full(cell.runs, np.nan)
    curve = np.zeros(cell.rounds + 1)
    shapley = dict(shapley or {})
    for run in range(cell.runs):
        rng = run_rng(cell.seed, cell.users, run)
        expert = int(rng.integers(cell.users + 1))
        start = rng.uniform(0.0, 5.0, vectors.shape[1])
        target = vectors[expert]
        contributors = np.delete(vectors, expert, axis=0)
        space = VectorSpace(contributors, target, evaluation, delta=cell.delta)
        engine = Tournament(cell.names(opts).build(plugins), cell.rounds)
        # The tournament's own randomness is separate from the run's draw of expert and start.
        trng = np.random.default_rng([cell.seed, cell.users, run, 1])
        state = engine.start(space, start)
        dist = np.empty(cell.rounds + 1)
        dist[0] = np.linalg.norm(state.base - target)
        for r in range(cell.rounds):
            state, _, _ = engine.step(space, state, trng)
            dist[r + 1] = np.linalg.norm(state.base - target)
        curve += dist
        final[run] = dist[-1]
        hit = np.flatnonzero(dist[1:] <= DISTANCE_THRESHOLD)
        if len(hit):
            to5[run] = hit[0] + 1
        if expert not in shapley:
            shapley[expert] = shapley_values(
                vectors,
                expert,
                cell.evaluation,
                cell.valuation,
                cell.seed,
                opts.get("valuation"),
                opts.get("evaluation"),
            )
        pr[run] = pearson(state.points, shapley[expert])
        sp[run] = spearman(state.points, shapley[expert])
    return CellResult(cell, final, to5, pr, sp, curve / cell.runs)


# -- sweeps ---------------------------------------------------------------------------------


GameKey = tuple[int, str, str, int]  # users, evaluation, valuation, seed


def _shapley_job(
    args: tuple[int, int, str, str, int, str, dict[str, Any] | None],
) -> tuple[GameKey, int, np.ndarray]:
    users, expert, evaluation, valuation, seed, data_dir, evaluation_options = args
    vectors = population(load_movielens(Path(data_dir)), users)
    values = shapley_values(
        vectors, expert, evaluation, valuation, seed, evaluation_options=evaluation_options
    )
    return (users, evaluation, valuation, seed), expert, values


def _cell_job(args: tuple[Cell, str, dict[int, np.ndarray], dict[str, Any] | None]) -> CellResult:
    cell, data_dir, shapley, opts = args
    return run_cell(cell, Path(data_dir), shapley, opts)


def sweep(
    cells: Sequence[Cell],
    data_dir: Path,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    strategy_options: dict[str, Any] | None = None,
    ray_address: str | None = None,
) -> list[CellResult]:
    """Run ``cells`` on ``workers`` processes: first every distinct Shapley game, then the
    tournaments. ``progress(n)`` is called as work completes (games, then cells).

    ``ray_address``: run every game and every cell as a Ray task instead (``"local"``: a
    local Ray; ``"auto"`` or ``HOST:PORT``: a running cluster, whose nodes need this package
    and the data at the same path). The results are the same as a local sweep's."""
    if ray_address is not None:
        return _sweep_with(_ray_map(ray_address), cells, Path(data_dir), progress, strategy_options)
    workers = workers or os.cpu_count() or 1
    data_dir = Path(data_dir)
    pool_ctx = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        if pool_ctx is None:
            return _sweep_with(map, cells, data_dir, progress, strategy_options)
        pool = pool_ctx

        def mapper(fn: Callable[..., Any], jobs: Sequence[Any]) -> Iterable[Any]:
            # many small games in chunks; the fewer, longer cells one at a time
            chunk = max(1, len(jobs) // (workers * 8)) if fn is _shapley_job else 1
            return pool.map(fn, jobs, chunksize=chunk)

        return _sweep_with(mapper, cells, data_dir, progress, strategy_options)
    finally:
        if pool_ctx:
            pool_ctx.shutdown()


def _sweep_with(
    mapper: Callable[..., Iterable[Any]],
    cells: Sequence[Cell],
    data_dir: Path,
    progress: Callable[[int], None] | None,
    strategy_options: dict[str, Any] | None,
) -> list[CellResult]:
    load_movielens(data_dir)  # fail early, in this process, on bad data
    games = sorted(
        {
            (c.users, expert_of(c.seed, c.users, run), c.evaluation, c.valuation, c.seed)
            for c in cells
            for run in range(c.runs)
        }
    )
    # the Shapley games score coalitions with the evaluation the tournaments use, options too
    evaluation_options = (strategy_options or {}).get("evaluation")
    jobs = [(*g, str(data_dir), evaluation_options) for g in games]
    table: dict[GameKey, dict[int, np.ndarray]] = {}
    for key, expert, values in mapper(_shapley_job, jobs):
        table.setdefault(key, {})[expert] = values
        if progress:
            progress(1)
    cell_jobs = [
        (
            c,
            str(data_dir),
            table.get((c.users, c.evaluation, c.valuation, c.seed), {}),
            strategy_options,
        )
        for c in cells
    ]
    results = []
    for result in mapper(_cell_job, cell_jobs):
        results.append(result)
        if progress:
            progress(1)
    return results


def _ray_map(address: str) -> Callable[..., Iterable[Any]]:
    """A ``map`` whose calls are Ray tasks (results in the order of the jobs)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('a sweep on Ray needs Ray: pip install "crowd-sft[scale]"') from None
    if address not in ("local", "auto"):
        check_ray_address(address, "--ray")
    if not ray.is_initialized():
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    tasks: dict[Any, Any] = {}

    def mapper(fn: Callable[..., Any], jobs: Sequence[Any]) -> Iterable[Any]:
        task = tasks.setdefault(fn, ray.remote(fn))
        refs = [task.remote(job) for job in jobs]
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                # an error Crowd-SFT raised on purpose in the task (a failing plugin, say):
                # its own one line, not Ray's message with the worker's whole traceback
                cause = getattr(exc, "cause", None)
                if isinstance(cause, CrowdSFTError):
                    raise cause from None
                raise

    return mapper


def work_units(cells: Sequence[Cell]) -> int:
    """How many ``progress`` steps ``sweep`` makes for ``cells``."""
    games = {
        (c.users, expert_of(c.seed, c.users, run), c.evaluation, c.valuation, c.seed)
        for c in cells
        for run in range(c.runs)
    }
    return len(games) + len(cells)


def write_summary(results: Sequence[CellResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        for r in results:
            row = r.summary()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_plots(results: Sequence[CellResult], out: Path) -> list[Path]:
    """The sweep's figures as PNG files in ``out``."""
    plt = pyplot()

    out.mkdir(parents=True, exist_ok=True)
    combos: dict[str, list[CellResult]] = {}
    for r in results:
        combos.setdefault(f"{r.cell.grouping} / {r.cell.evaluation}", []).append(r)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rs in sorted(combos.items()):
        ax.plot(np.mean([r.distance_curve for r in rs], axis=0), label=name)
    ax.axhline(DISTANCE_THRESHOLD, color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="round",
        ylabel="mean L2 distance to the expert",
        title="Distance over rounds per grouping / evaluation",
    )
    ax.legend(fontsize=8)
    paths.append(save(fig, dpi=110, path=out / "distance_over_rounds.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rs in sorted(combos.items()):
        x = np.mean([np.mean(r.final_distance) for r in rs])
        y = np.nanmean([r.summary()["mean_pearson"] for r in rs])
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(
        xlabel="mean final distance",
        ylabel="mean Pearson(points, Shapley)",
        title="Fairness versus convergence, per combination",
    )
    paths.append(save(fig, dpi=110, path=out / "pearson_vs_distance.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    by_groups: dict[int, dict[int, list[float]]] = {}
    for r in results:
        by_groups.setdefault(r.cell.groups, {}).setdefault(r.cell.users, []).append(
            r.summary()["mean_pearson"]
        )
    for g, per_users in sorted(by_groups.items()):
        users = sorted(per_users)
        ax.plot(users, [np.nanmean(per_users[u]) for u in users], marker="o", label=f"{g} groups")
    ax.set(
        xlabel="users", ylabel="mean Pearson(points, Shapley)", title="Fairness versus crowd size"
    )
    ax.legend()
    paths.append(save(fig, dpi=110, path=out / "pearson_vs_users.png"))
    return paths
