"""``crowdsft simulate`` and ``crowdsft sweep``: the paper's vector-space game."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import click

from crowdsft.console import echo_json, progress_bar


def _csv(kind: str):
    def convert(ctx: click.Context, param: click.Parameter, value: str) -> list:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise click.BadParameter("give at least one value")
        if kind == "int":
            try:
                return [int(v) for v in items]
            except ValueError:
                raise click.BadParameter(
                    f"{value!r} is not a comma-separated list of integers"
                ) from None
        return items

    return convert


def _check_names(kind: str, names: list[str]) -> None:
    from crowdsft.plugins.manager import get_plugins

    plugins = get_plugins()
    for name in names:
        plugins.get(kind, name)  # PluginError names the registered ones


def _parse_options(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    """``KIND.KEY=VALUE`` (VALUE read as JSON where it parses, else as a string) into
    ``{kind: {key: value}}``."""
    import json

    kinds = ("grouping", "selection", "reward", "influence", "evaluation")
    out: dict[str, dict] = {}
    for item in values:
        target, sep, raw = item.partition("=")
        kind, dot, key = target.partition(".")
        if not sep or not dot or not key or kind not in kinds:
            raise click.BadParameter(
                f"{item!r}: give KIND.KEY=VALUE with KIND one of {', '.join(kinds)}"
            )
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(kind, {})[key] = value
    return out


def _check_options(options: dict, names: dict, groups: int, error: float) -> None:
    """Build each strategy that has options once with them: a bad key or value is a clear
    error before any run starts."""
    from crowdsft.plugins.manager import get_plugins

    engine: dict[str, dict] = {"grouping": {"groups": groups}, "selection": {"error": error}}
    for kind, opts in options.items():
        try:
            get_plugins().create(kind, names[kind], **engine.get(kind, {}), **opts)
        except ValueError as exc:
            raise click.BadParameter(
                f"{kind} options {opts}: {exc}", param_hint="--option"
            ) from None


def _check_players(valuations: list[str], users: list[int]) -> None:
    """A valuation that cannot value this many players (``exact`` beyond its
    ``max_players``) is refused in one line before any work starts."""
    from crowdsft.plugins.manager import get_plugins

    for name in valuations:
        limit = getattr(get_plugins().create("valuation", name), "max_players", None)
        if isinstance(limit, int) and max(users) > limit:
            raise click.BadParameter(
                f"{name!r} values at most {limit} players and --users asks for {max(users)} "
                "(use 'permutation', or fewer users)",
                param_hint="--valuation",
            )


def _option_option(f):
    return click.option(
        "--option",
        "options",
        multiple=True,
        callback=_parse_options,
        metavar="KIND.KEY=VALUE",
        help="An option for a strategy's factory, such as reward.scale=5 or "
        "grouping.jitter=0.1 (repeatable; VALUE is read as JSON where it parses).",
    )(f)


def _data_option(f):
    return click.option(
        "--data",
        "data_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="MovieLens ml-latest-small folder [default: $CROWDSFT_DATA, else what `crowdsft "
        "data fetch movielens` fetched].",
    )(f)


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if isinstance(v, float) and math.isnan(v) else format(v, spec)


@click.command()
@click.option("--users", default=50, show_default=True, type=click.IntRange(2))
@click.option("--groups", default=3, show_default=True, type=click.IntRange(1))
@click.option("--grouping", default="random", show_default=True)
@click.option("--evaluation", default="l2", show_default=True)
@click.option("--reward", default="rank", show_default=True)
@click.option("--valuation", default="permutation", show_default=True)
@click.option("--influence", default="points-squared", show_default=True)
@click.option(
    "--error",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Judging-error probability of the selection.",
)
@click.option("--rounds", default=100, show_default=True, type=click.IntRange(1))
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@_option_option
@_data_option
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def simulate(
    users,
    groups,
    grouping,
    evaluation,
    reward,
    valuation,
    influence,
    error,
    rounds,
    runs,
    seed,
    options,
    data_dir,
    as_json,
) -> None:
    """Run the paper's MovieLens game for one strategy combination.

    Prints the mean final distance to the expert, the mean number of rounds until the
    distance first drops to 5 or below (over the runs that get there), and the mean Pearson
    and Spearman correlations of the final points with Shapley values.
    """
    import numpy as np

    from crowdsft.simulation.game import Cell, default_data_dir, run_cell

    for kind, name in (
        ("grouping", grouping),
        ("evaluation", evaluation),
        ("reward", reward),
        ("valuation", valuation),
        ("influence", influence),
    ):
        _check_names(kind, [name])
    _check_players([valuation], [users])
    _check_options(
        options,
        {"grouping": grouping, "selection": "best", "reward": reward, "influence": influence}
        | {"evaluation": evaluation},
        groups,
        error,
    )
    cell = Cell(
        users=users,
        groups=groups,
        grouping=grouping,
        evaluation=evaluation,
        reward=reward,
        valuation=valuation,
        influence=influence,
        error=error,
        rounds=rounds,
        runs=runs,
        seed=seed,
    )
    t0 = time.perf_counter()
    result = run_cell(cell, data_dir or default_data_dir(), strategy_options=options)
    summary = result.summary()
    summary["runs_reaching_5"] = int(np.count_nonzero(~np.isnan(result.rounds_to_5)))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if as_json:
        echo_json(summary)
        return
    click.echo(
        f"{users} users, {groups} groups, {grouping} grouping, {evaluation} evaluation, "
        f"{reward} reward, {valuation} Shapley values; {runs} runs of {rounds} rounds"
    )
    click.echo(f"mean final distance: {_fmt(summary['mean_final_distance'])}")
    click.echo(
        f"mean rounds to 5:    {_fmt(summary['mean_rounds_to_5'], '.1f')} "
        f"({summary['runs_reaching_5']} of {runs} runs got there)"
    )
    click.echo(f"mean Pearson:        {_fmt(summary['mean_pearson'])}")
    click.echo(f"mean Spearman:       {_fmt(summary['mean_spearman'])}")


@click.command()
@click.option("--users", default="10,25,50,75,100", show_default=True, callback=_csv("int"))
@click.option("--groups", default="2,3,4,5", show_default=True, callback=_csv("int"))
@click.option(
    "--grouping",
    default="random,epsilon-greedy,interleaved",
    show_default=True,
    callback=_csv("str"),
)
@click.option("--evaluation", default="l2,l1,dot", show_default=True, callback=_csv("str"))
@click.option("--reward", default="rank", show_default=True, callback=_csv("str"))
@click.option("--valuation", default="permutation", show_default=True, callback=_csv("str"))
@click.option("--rounds", default=100, show_default=True, type=click.IntRange(1))
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--workers", default=0, type=click.IntRange(0), help="Processes to use [default: one per CPU]."
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run every game and cell as a Ray task: alone, on a local Ray; with 'auto' or "
    "HOST:PORT, on that cluster (its nodes need this package and the data at the same path).",
)
@_option_option
@click.option("--no-plots", is_flag=True, help="Write summary.csv only.")
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
@_data_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for summary.csv and the plots.",
)
def sweep(
    users,
    groups,
    grouping,
    evaluation,
    reward,
    valuation,
    rounds,
    runs,
    seed,
    workers,
    ray_address,
    options,
    no_plots,
    no_progress,
    data_dir,
    out,
) -> None:
    """Run the paper's grid of simulations and write DIR/summary.csv and PNG plots.

    Every comma-separated value of every option is crossed with all the others. Shapley
    values are computed once per distinct game and shared by all combinations. --option
    passes an option to a strategy of every cell (reward.scale=5, grouping.jitter=0.1).
    """
    from crowdsft.simulation.game import (
        Cell,
        default_data_dir,
        work_units,
        write_plots,
        write_summary,
    )
    from crowdsft.simulation.game import (
        sweep as run_sweep,
    )

    for kind, names in (
        ("grouping", grouping),
        ("evaluation", evaluation),
        ("reward", reward),
        ("valuation", valuation),
    ):
        _check_names(kind, names)
    _check_players(valuation, users)
    for combination in itertools.product(grouping, reward, evaluation, groups):
        _check_options(
            options,
            dict(zip(("grouping", "reward", "evaluation"), combination[:3], strict=True))
            | {"selection": "best", "influence": "points-squared"},
            combination[3],
            0.05,
        )
    cells = [
        Cell(
            users=u,
            groups=g,
            grouping=gr,
            evaluation=ev,
            reward=rw,
            valuation=va,
            rounds=rounds,
            runs=runs,
            seed=seed,
        )
        for u in users
        for g in groups
        for gr in grouping
        for ev in evaluation
        for rw in reward
        for va in valuation
    ]
    if not no_plots:
        try:
            import matplotlib  # noqa: F401 - checked before hours of work, not after
        except ImportError:
            raise click.UsageError(
                "plots need matplotlib: pip install 'crowd-sft[sim]', or pass --no-plots"
            ) from None
    bad = [c for c in cells if c.groups > c.users]
    if bad:
        raise click.BadParameter(f"{bad[0].groups} groups cannot be made of {bad[0].users} users")
    t0 = time.perf_counter()
    with progress_bar(work_units(cells), f"{len(cells)} cells", enabled=not no_progress) as bar:
        results = run_sweep(
            cells,
            data_dir or default_data_dir(),
            workers=workers or None,
            progress=bar,
            ray_address=ray_address,
            strategy_options=options,
        )
    elapsed = time.perf_counter() - t0
    write_summary(results, out / "summary.csv")
    written = [out / "summary.csv"]
    if not no_plots:
        written += write_plots(results, out)
    click.echo(f"{len(cells)} cells x {runs} runs x {rounds} rounds in {elapsed:.1f}s")
    for p in written:
        click.echo(f"wrote {p}")


@click.group()
def data() -> None:
    """Data sets the simulation uses."""


@data.command()
@click.argument("name", type=click.Choice(["movielens"]))
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to unpack into [default: ml-latest-small in the user's data folder, where "
    "simulate and sweep look].",
)
@click.option("--url", help="Download from here instead of GroupLens (a mirror).")
@click.option("--sha256", help="Also check the archive's own SHA-256.")
@click.option("--force", is_flag=True, help="Fetch again even where a good copy is present.")
def fetch(name: str, dest: Path | None, url: str | None, sha256: str | None, force: bool) -> None:
    """Download the MovieLens ml-latest-small archive, check it and unpack it.

    The files the simulation reads are checked against pinned SHA-256 hashes before anything
    is unpacked where simulate and sweep look for them.
    """
    from crowdsft.simulation.fetch import MOVIELENS_URL, fetch_movielens

    shown = {"last": -1}

    def progress(done: int, total: int) -> None:
        step = done * 10 // total if total else done >> 20
        if step != shown["last"]:
            shown["last"] = step
            what = f"{done * 100 // total}%" if total else f"{done >> 20} MiB"
            click.echo(f"  downloaded {what}", err=True)

    source = url or MOVIELENS_URL
    click.echo(f"fetching {source}", err=True)
    folder = fetch_movielens(dest, url=source, sha256=sha256, force=force, progress=progress)
    click.echo(f"MovieLens ml-latest-small checked and unpacked in {folder}")
